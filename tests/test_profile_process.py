"""The profile writer process: it stores everything, never stalls the data path
on a locked database, and leaves no process behind."""

from __future__ import annotations

import sqlite3
import time

import psutil
from conftest import profiled_two_stages

from pystream_zmq.profiling import store

ITEMS = 300


def test_every_event_and_counter_is_stored_by_cleanup() -> None:
    pipeline = profiled_two_stages()
    try:
        writers = [p for p in psutil.Process().children() if "writer_process" in str(p.cmdline())]
        assert len(writers) == 1
        for x in range(ITEMS):
            assert pipeline.forward({"x": x})
        pipeline.stop_loop()
    finally:
        pipeline.cleanup()
    assert not writers[0].is_running() or writers[0].status() == psutil.STATUS_ZOMBIE
    report = pipeline.get_profile_report()
    assert report is not None
    items = {stage.path: stage.items for stage in report.stages}
    assert items == dict.fromkeys(
        ["MainPipeline", "MainPipeline__StageA", "MainPipeline__StageB"], ITEMS
    )
    main = report.stages[0].counters
    assert main["delivered"] == ITEMS and main["dropped_events"] == 0
    assert report.stages[1].counters["processed"] == ITEMS


def test_a_locked_db_stalls_neither_the_items_nor_cleanup() -> None:
    pipeline = profiled_two_stages(stop_timeout=2.0)
    lock = sqlite3.connect(store.profiler_db_path(), isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        for x in range(ITEMS):
            assert pipeline.forward({"x": x})
        pipeline.stop_loop()
        assert pipeline.stats().delivered == ITEMS
        started = time.monotonic()
        pipeline.cleanup()  # the writer process gives up on the lock within stop_timeout
        assert time.monotonic() - started < 2.0 + 1.5
    finally:
        pipeline.cleanup()
        lock.close()


def test_profiles_right_after_stop_loop_include_every_item() -> None:
    pipeline = profiled_two_stages()
    try:
        for x in range(ITEMS):
            assert pipeline.forward({"x": x})
        pipeline.stop_loop()
        report = pipeline.get_profile_report()  # the flush barrier: no waiting here
        assert report is not None
        assert [stage.items for stage in report.stages] == [ITEMS] * 3
        for x in range(ITEMS):
            assert pipeline.forward({"x": x})
        pipeline.stop_loop()
        latency, _ = pipeline.get_profiles()
        report = pipeline.get_profile_report()
        assert report is not None and [stage.items for stage in report.stages] == [2 * ITEMS] * 3
        assert list(latency) == [stage.path for stage in report.stages]
    finally:
        pipeline.cleanup()
