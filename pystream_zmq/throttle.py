"""A log line that a flood cannot multiply: a rogue peer or a refused client can repeat the
same event every few milliseconds, and the counters already keep the exact number."""

from __future__ import annotations

import logging
import time

EVERY = 10.0  # seconds between two lines of the same kind


class Throttled:
    """Logs ``message % args`` at most once every ``every`` seconds; the next line says how
    many were left out in between."""

    def __init__(
        self, logger: logging.Logger, level: int, message: str, every: float = EVERY
    ) -> None:
        self._logger = logger
        self._level = level
        self._message = message
        self._every = every
        self._next = 0.0
        self._quiet = 0

    def __call__(self, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._quiet += 1
            return
        extra = f" (and {self._quiet} more since the last line)" if self._quiet else ""
        self._logger.log(self._level, self._message + extra, *args)
        self._next, self._quiet = now + self._every, 0
