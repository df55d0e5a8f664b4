"""Waiting against a deadline, in slices short enough that a pipeline which can no longer
go on (a worker past its restarts) ends the wait at once instead of at the timeout."""

from __future__ import annotations

import time
from collections.abc import Callable

SLICE_MS = 100


class Deadline:
    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def left_ms(self) -> int:
        return int(self.left() * 1000)


def in_slices(
    deadline: Deadline, attempt: Callable[[int], bool], failed: Callable[[], bool]
) -> bool:
    """Retry ``attempt(timeout_ms)`` in slices of at most SLICE_MS until it succeeds, the
    deadline passes or ``failed()``."""
    while not attempt(min(deadline.left_ms(), SLICE_MS)):
        if not deadline.left() or failed():
            return False
    return True
