"""Every output, in order, for ``Pipeline.results()``: next to PyStream's latest-only
``get_results()``, a queue that keeps each output until the reader takes it.

It keeps outputs only once someone subscribed (``results()`` was called): a pipeline whose
outputs nobody reads must not fill up. Its size is bounded by the pipeline's own
backpressure: under ``parallelize()`` an unread output still holds its credit (the
orchestrator counts it in flight, orchestrator/ingress.py), and under ``serialize()``
``forward()`` waits for room (``capacity``).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator
from typing import Any

_TAKE_SLICE = 0.1  # seconds every_output() waits for an output before it looks at the input
_TAKE_MOST = 64  # outputs taken at once: what a reader holds past the pipeline's own bound


class EveryOutput:
    """Outputs in the order ``put()`` is called. ``cond`` guards it: the collector's own
    condition under ``parallelize()``, so that one notify wakes the reader and a
    ``forward()`` waiting for a credit alike."""

    def __init__(self, cond: threading.Condition, capacity: int | None = None) -> None:
        self._cond = cond
        self._capacity = capacity
        self._queue: collections.deque[Any] = collections.deque()
        self.subscribed = False

    def subscribe(self) -> None:
        with self._cond:
            self.subscribed = True

    def put(self, output: Any) -> None:
        """Keep ``output`` if someone subscribed (the caller holds ``cond`` and notifies)."""
        if self.subscribed:
            self._queue.append(output)

    def add(self, output: Any) -> None:
        """``put()`` for a caller that does not hold ``cond``; no lock while nobody reads."""
        if not self.subscribed:
            return
        with self._cond:
            self.put(output)
            self._cond.notify_all()

    def unread(self) -> int:
        return len(self._queue)

    def wait_for_room(self, timeout: float) -> bool:
        """Whether the queue is below its capacity, waiting up to ``timeout`` seconds."""
        capacity = self._capacity
        if capacity is None or not self.subscribed:
            return True
        with self._cond:
            return self._cond.wait_for(lambda: len(self._queue) < capacity, timeout)

    def take(self, timeout: float) -> list[Any]:
        """The next outputs, as many as have come (at most _TAKE_MOST), waiting up to
        ``timeout`` for the first; [] when none came. Several at once: a lock and a
        wake-up per output cost a reader of small items more than the rest of its work."""
        with self._cond:
            queue = self._queue
            if not self._cond.wait_for(lambda: bool(queue), timeout):
                return []
            taken = [queue.popleft() for _ in range(min(len(queue), _TAKE_MOST))]
            self._cond.notify_all()  # credits, or room, came back
            return taken


def every_output(
    take: Callable[[float], list[Any]],
    input_done: Callable[[], bool],
    running: Callable[[], bool],
) -> Iterator[Any]:
    """Yield what ``take(timeout)`` gives until ``input_done()``, then what is left; stop
    early once the pipeline is no longer ``running()``."""
    while running():
        taken = take(_TAKE_SLICE)
        if taken:
            yield from taken
        elif input_done():
            while taken := take(0.0):
                yield from taken
            return
