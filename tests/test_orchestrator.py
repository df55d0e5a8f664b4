"""The orchestrator's pieces: the control channel shared by user threads, the one cleanup
path of a failed start, and the profile receiver's rule for dropped_events."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from stages import Unloadable, add_one

from pystream_zmq import Pipeline
from pystream_zmq.errors import WorkerStartupError
from pystream_zmq.profiling.events import pack_events
from pystream_zmq.profiling.receiver import ProfileReceiver
from pystream_zmq.stage import MAIN_PIPELINE_NAME
from pystream_zmq.wire import codec, transport

STAGES = {f"{MAIN_PIPELINE_NAME}__One", f"{MAIN_PIPELINE_NAME}__Two"}


def test_stats_from_two_threads_at_once_each_hear_from_every_worker() -> None:
    """Two threads asking every worker at once: each gets every worker's counters (the
    control channel serves one exchange at a time, so neither takes the other's replies)."""
    with Pipeline() as pipeline:
        pipeline.add(add_one, "One")
        pipeline.add(add_one, "Two")
        pipeline.parallelize(block_output=True)
        assert pipeline.forward({"x": 1}) and pipeline.get_results() == {"x": 3}
        for _ in range(5):
            assert _stats_from_two_threads(pipeline) == [STAGES, STAGES]


def _stats_from_two_threads(pipeline: Pipeline) -> list[set[str]]:
    """The stage paths each of two threads, started together, got from stats()."""
    start = threading.Barrier(2)
    seen: list[set[str]] = []

    def ask() -> None:
        start.wait(timeout=10)
        seen.append(set(pipeline.stats().stages))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    return seen


def test_a_failed_start_stops_every_process_and_removes_the_socket_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pipeline = Pipeline(use_profiler=True)
    pipeline.add(add_one, "One")
    pipeline.add(Unloadable(), "Broken")
    with pytest.raises(WorkerStartupError, match="Broken"):
        pipeline.parallelize()
    assert [name for name in os.listdir(tmp_path) if name.startswith("pystream-")] == []
    pipeline.cleanup()  # the conftest fixture checks that no process is left


class _Sink:
    def __init__(self, dropped: int) -> None:
        self.dropped_events = dropped
        self.batches: list[Any] = []
        self.snapshots: list[Any] = []

    def events(self, events: Any) -> bool:
        self.batches.append(events)
        return True

    def counters(self, counters: Any) -> bool:
        self.snapshots.append(counters)
        return True


def test_the_receiver_adds_its_stores_drops_to_main_pipeline_only() -> None:
    sink = _Sink(dropped=3)
    receiver = ProfileReceiver(sink)
    counters = {MAIN_PIPELINE_NAME: {"dropped_events": 2}, "Main__A": {"dropped_events": 1}}
    assert receiver.take([transport.COUNTERS, *codec.encode(counters)]) == transport.COUNTERS
    assert sink.snapshots == [
        {MAIN_PIPELINE_NAME: {"dropped_events": 5}, "Main__A": {"dropped_events": 1}}
    ]
    events = [("Main__A", 1, 1.0, 2.0, 3.0)]
    receiver.take([transport.EVENTS, pack_events(events)])
    receiver.take([transport.PROFILE_END, b"0"])
    receiver.take([b"bogus"])
    assert (sink.batches, receiver.events, receiver.ends, receiver.malformed) == ([events], 1, 1, 1)


def test_without_a_sink_the_receiver_only_counts_ends() -> None:
    receiver = ProfileReceiver(None)
    for message in ([transport.PROFILE_END, b"0"], [b"bogus"], [transport.EVENTS, b"x"]):
        receiver.take(message)
    assert (receiver.ends, receiver.events, receiver.malformed) == (1, 0, 0)
