"""Pacing a source: one item every ``period`` seconds, shared by ``start_loop()`` and
``pystream-worker source``."""

from __future__ import annotations

import threading
import time


class Pacer:
    """Waits out the rest of each period. A source slower than its period does not burst
    to catch up: the next period starts when the late item went out."""

    def __init__(self, period: float) -> None:
        self.period = period
        self._next_at = time.monotonic()

    def wait(self, stop: threading.Event) -> bool:
        """Wait until the next item is due; True if ``stop`` was set meanwhile."""
        self._next_at += self.period
        delay = self._next_at - time.monotonic()
        if delay < 0:
            self._next_at = time.monotonic()
            return stop.is_set()
        return stop.wait(delay)
