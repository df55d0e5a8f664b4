"""Pacing a source: one item every ``period`` seconds (``Pacer``, shared by ``start_loop()``
and ``pystream-worker source``), and ``start_loop()``'s thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


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


class InputLoop(threading.Thread):
    """Calls ``forward()`` every ``period`` seconds until stopped, or until ``ended()`` (the
    end of the input stream). When the pipeline is slower than the period it does not burst
    to catch up."""

    def __init__(
        self, forward: Callable[[], bool], period: float, ended: Callable[[], bool]
    ) -> None:
        super().__init__(name="pystream-input-loop", daemon=True)
        self._forward = forward
        self._period = period
        self._ended = ended
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        self.refused = 0

    def run(self) -> None:
        pacer = Pacer(self._period)
        while not self._stopping.is_set():
            try:
                if not self._forward():
                    if self._ended():
                        return
                    self.refused += 1
            except Exception as e:
                log.exception("the input loop stopped: forward() raised")
                self.error = e
                return
            if pacer.wait(self._stopping):
                return

    def stop(self) -> None:
        self._stopping.set()
        self.join()
