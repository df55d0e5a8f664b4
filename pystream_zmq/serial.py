"""Serial mode: every stage runs inline, in the caller's thread.

What may pass between stages is what ``parallelize()`` could send (``Pipeline.serialize``,
``check_sendable``): the input of ``forward()`` and the output of each unit of the plan
(a stage, or a serialized child pipeline's stages together) are checked with
``codec.check``, which refuses exactly what ``codec.encode`` would, in the same words."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pystream_zmq.errors import StageError
from pystream_zmq.every import EveryOutput
from pystream_zmq.profiling.store import ProfileRun
from pystream_zmq.stage import MAIN_PIPELINE_NAME, Event, EventBuffer, Leaf, StageChain
from pystream_zmq.stats import PipelineStats
from pystream_zmq.wire import codec

_COUNTERS_INTERVAL = 1.0  # at most this often, a batch of events brings a counters snapshot
_KEPT = 4  # outputs a results() reader may leave unread before forward() waits for it
_READER_WAIT = 10.0  # seconds forward() waits for the reader, then returns False


class SerialRunner:
    """Runs ``units`` ((unit path, leaves), in chain order) one after the other on each
    item. With ``max_message_bytes`` (``check_sendable``), what ``codec.check`` refuses as
    ``forward()``'s input makes ``forward()`` raise, and as a unit's output is the error of
    the unit's last stage, as in a worker: logged, counted (``encode_errors`` under the
    unit's path), the item dropped."""

    def __init__(
        self,
        units: Sequence[tuple[str, Sequence[Leaf]]],
        profile: ProfileRun | None,
        raising: frozenset[str],
        max_message_bytes: int | None = None,
    ) -> None:
        recorder = profile.open_recorder() if profile is not None else None
        self._recorder = recorder
        self._raising = raising
        self._events = EventBuffer(self._record) if recorder is not None else None
        self._check = None if max_message_bytes is None else _checker(max_message_bytes)
        # A unit without stages hands on what it was given, which was checked already.
        ends = {unit[-1][0]: path for path, unit in units if unit}
        self._chain = StageChain(
            [leaf for _, unit in units for leaf in unit],
            self._events.add if self._events else None,
            self._check,
            ends,
        )
        self._run_lock = threading.Lock()  # one item through the stages at a time
        self._latest_lock = threading.Lock()  # get_results() need not wait for a forward()
        self._next_seq = 0
        self._delivered = 0
        self._counters_sent = time.monotonic()
        self._latest: Any = None
        self._has_new = False
        self.every = EveryOutput(threading.Condition(), capacity=_KEPT)

    def forward(self, data: Any) -> bool:
        if self._check is not None:  # raises as parallelize()'s forward() would: nothing taken
            self._check(data)
        if not self.every.wait_for_room(_READER_WAIT):
            return False  # a results() reader fell behind
        with self._run_lock:
            seq = self._next_seq
            self._next_seq += 1
            start = time.time()
            ok, out = self._chain.run(data, seq, start)
            if not ok:
                if out.path in self._raising:
                    raise StageError(out.path, seq, out.message, out.traceback)
                return True  # the item was taken; the failing stage logged and counted it
            self._delivered += 1
            if self._events is not None:
                self._events.add((MAIN_PIPELINE_NAME, seq, start, start, time.time()))
        with self._latest_lock:
            self._latest, self._has_new = out, True
        self.every.add(out)
        return True

    def subscribe(self) -> int:
        """Keep every output from now on (results()); how many came out before."""
        self.every.subscribe()
        return self._delivered

    def take_output(self, timeout: float) -> list[Any]:
        return self.every.take(timeout)

    def _stage_counters(self) -> dict[str, dict[str, int]]:
        """{path: {name: value}}: each stage's errors, and each unit's refused outputs."""
        counters = {path: {"stage_errors": n} for path, n in self._chain.errors.items()}
        for path, n in self._chain.encode_errors.items():
            counters.setdefault(path, {})["encode_errors"] = n
        return counters

    def get_results(self) -> Any:
        with self._latest_lock:
            if not self._has_new:
                return None
            latest, self._latest, self._has_new = self._latest, None, False
            return latest

    def stats(self) -> PipelineStats:
        with self._run_lock:
            dropped = self._next_seq - self._delivered  # a stage raised, or its output was refused
            return PipelineStats(
                mode="serial",
                forwarded=self._next_seq,
                delivered=self._delivered,
                dropped=dropped,
                out=self._next_seq,
                stages=self._stage_counters(),
            )

    def flush_profile(self) -> None:
        """Store the profile records so far."""
        with self._run_lock:
            if self._events is not None and self._recorder is not None:
                self._events.flush()
                self._record_counters()
                self._recorder.writer.flush()

    def close(self, *, cleanup: bool = True) -> None:
        """Run every stage's cleanup() (unless not ``cleanup``: the stages go on in another
        pipeline) and hand on the last profile events and counters."""
        self.flush_profile()
        if cleanup:
            with self._run_lock:
                self._chain.cleanup()
        if self._recorder is not None:
            self._recorder.close()

    def _record(self, events: list[Event]) -> None:
        assert self._recorder is not None
        self._recorder.events(events)
        if time.monotonic() - self._counters_sent >= _COUNTERS_INTERVAL:
            self._record_counters()

    def _record_counters(self) -> None:
        assert self._recorder is not None
        self._counters_sent = time.monotonic()
        main = {
            "forwarded": self._next_seq,
            "delivered": self._delivered,
            "dropped_events": self._recorder.writer.dropped_events,
        }
        self._recorder.counters({MAIN_PIPELINE_NAME: main, **self._stage_counters()})


def _checker(max_message_bytes: int) -> Callable[[Any], None]:
    def check(data: Any) -> None:
        codec.check(data, max_message_bytes=max_message_bytes)

    return check
