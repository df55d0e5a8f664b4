"""Serial mode: every stage runs inline, in the caller's thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .stage import MAIN_PIPELINE_NAME, Event, EventBuffer, Leaf, StageChain


class SerialRunner:
    def __init__(
        self, leaves: Sequence[Leaf], record: Callable[[list[Event]], object] | None
    ) -> None:
        self._events = EventBuffer(record) if record is not None else None
        self._chain = StageChain(leaves, self._events.add if self._events else None)
        self._run_lock = threading.Lock()  # one item through the stages at a time
        self._latest_lock = threading.Lock()  # get_results() need not wait for a forward()
        self._next_seq = 0
        self._latest: Any = None
        self._has_new = False

    def forward(self, data: Any) -> bool:
        with self._run_lock:
            seq = self._next_seq
            self._next_seq += 1
            start = time.time()
            ok, out = self._chain.run(data, seq, start)
            if not ok:
                return True  # the item was taken; the failing stage logged and counted it
            if self._events is not None:
                self._events.add((MAIN_PIPELINE_NAME, seq, start, start, time.time()))
        with self._latest_lock:
            self._latest, self._has_new = out, True
        return True

    def get_results(self) -> Any:
        with self._latest_lock:
            if not self._has_new:
                return None
            latest, self._latest, self._has_new = self._latest, None, False
            return latest

    def flush_events(self) -> None:
        with self._run_lock:
            if self._events is not None:
                self._events.flush()

    def close(self) -> None:
        """Run every stage's cleanup() and hand on the last profile events."""
        with self._run_lock:
            self._chain.cleanup()
            if self._events is not None:
                self._events.flush()
