"""The profile writer process is supervised (issue 13, item 5): after ``kill -9`` of the
writer, a new one takes over the same run, a profile read never waits on the dead one, what
was lost with it is counted, and the report and ``pystream profile`` say so."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
from click.testing import CliRunner
from conftest import profiled_two_stages, wait_until

from pystream_zmq import Pipeline
from pystream_zmq.cli.main import main as cli
from pystream_zmq.profiling import store

ITEMS = 1000
PATHS = 3  # MainPipeline and its two stages: one event per item each
READ_BOUND = 1.0  # seconds a profile read may take once the new writer runs (was 5 s)


def _writers() -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process().children()
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        and "writer_process" in " ".join(p.cmdline())
    ]  # fmt: skip


def _kill_writer() -> int:
    (writer,) = _writers()
    os.kill(writer.pid, signal.SIGKILL)
    return writer.pid


def _replaced(old_pid: int) -> bool:
    return [p.pid for p in _writers() if p.pid != old_pid] != []


def _forward(pipeline: Pipeline, count: int) -> None:
    for x in range(count):
        assert pipeline.forward({"x": x})


def _timed_read(pipeline: Pipeline) -> float:
    started = time.monotonic()
    pipeline.get_profiles()
    return time.monotonic() - started


def test_a_killed_writer_is_replaced_and_stores_what_comes_after() -> None:
    """The reproduction: reads took 5 s each and returned stale data, with no sign."""
    pipeline = profiled_two_stages()
    try:
        _forward(pipeline, ITEMS)
        pipeline.stop_loop()
        report = pipeline.get_profile_report()  # everything so far stored
        assert report is not None and [s.items for s in report.stages] == [ITEMS] * PATHS
        complete_before_the_kill = getattr(report, "complete", None)
        old_pid = _kill_writer()
        assert wait_until(lambda: _replaced(old_pid), timeout=5)
        _forward(pipeline, ITEMS)  # the data path goes on
        pipeline.stop_loop()
        assert pipeline.stats().delivered == 2 * ITEMS
        pipeline.get_profiles()  # may wait for the senders to reconnect to the new writer
        assert max(_timed_read(pipeline) for _ in range(3)) < READ_BOUND
        report = pipeline.get_profile_report()
        assert report is not None
        # The writer died with nothing in its queues: what came after it is all stored.
        assert [s.items for s in report.stages] == [2 * ITEMS] * PATHS
        assert complete_before_the_kill is True
        assert (report.complete, report.writer_restarts, report.missing) == (False, 1, 0)
        assert report.warning() is not None and "restarted 1 time" in report.warning()
    finally:
        pipeline.cleanup()
    assert _writers() == []
    main = pipeline.get_profile_report().stages[0].counters  # type: ignore[union-attr]
    assert main[store.WRITER_RESTARTS] == 1 and main[store.EVENTS_LOST] == 0
    assert main["delivered"] == 2 * ITEMS  # the final counters reached the new writer


def test_what_died_with_the_writer_is_counted_exactly() -> None:
    """Killed while records are on their way: every event is stored or counted missing."""
    pipeline = profiled_two_stages()
    try:
        _forward(pipeline, ITEMS)  # no flush: the writer holds records when it dies
        old_pid = _kill_writer()
        _forward(pipeline, ITEMS)
        pipeline.stop_loop()
        assert wait_until(lambda: _replaced(old_pid), timeout=5)
    finally:
        pipeline.cleanup()
    report = pipeline.get_profile_report()
    assert report is not None and not report.complete and report.writer_restarts == 1
    stored = sum(s.items for s in report.stages)
    assert stored + report.missing == PATHS * 2 * ITEMS, (stored, report.missing)
    assert report.stages[0].counters[store.EVENTS_LOST] == report.missing - (
        report.stages[0].dropped_events
    )


def test_past_its_restarts_the_run_is_marked_and_reads_return_at_once(
    profile_folder: Path,
) -> None:
    pipeline = profiled_two_stages(max_restarts=0)
    try:
        _forward(pipeline, ITEMS)
        pipeline.stop_loop()
        _kill_writer()
        assert wait_until(lambda: _marked_failed(profile_folder), timeout=5)
        _forward(pipeline, ITEMS)  # the data path goes on without a writer
        pipeline.stop_loop()
        assert max(_timed_read(pipeline) for _ in range(3)) < READ_BOUND
        assert _writers() == []
        started = time.monotonic()
        pipeline.cleanup()  # waits on no writer
        assert time.monotonic() - started < 5.0
    finally:
        pipeline.cleanup()
    report = pipeline.get_profile_report()
    assert report is not None
    assert (report.complete, report.writer_failed, report.writer_restarts) == (False, True, 0)
    assert report.stages[0].counters["delivered"] == 2 * ITEMS  # written without a writer
    assert "not restarted" in (report.warning() or "")


def _marked_failed(folder: Path) -> bool:
    db = folder / store.DB_FILENAME
    with_main = CliRunner().invoke(cli, ["profile", str(db), "--json"])
    return with_main.exit_code == 0 and json.loads(with_main.output)["writer_failed"]


def test_pystream_profile_and_top_warn_about_missing_records(profile_folder: Path) -> None:
    pipeline = profiled_two_stages()
    try:
        _forward(pipeline, ITEMS)
        old_pid = _kill_writer()
        assert wait_until(lambda: _replaced(old_pid), timeout=5)
        _forward(pipeline, ITEMS)
        pipeline.stop_loop()
    finally:
        pipeline.cleanup()
    db = str(profile_folder / store.DB_FILENAME)
    runner = CliRunner()
    table = runner.invoke(cli, ["profile", db])
    top = runner.invoke(cli, ["top", db, "--once"])
    as_json = runner.invoke(cli, ["profile", db, "--json"])
    assert (table.exit_code, top.exit_code, as_json.exit_code) == (0, 0, 0)
    for output in (table.output, top.output):
        warning = [line for line in output.splitlines() if line.startswith("warning:")]
        assert len(warning) == 1 and "profile writer died and was restarted 1 time" in warning[0]
    fields = json.loads(as_json.output)
    assert (fields["complete"], fields["writer_restarts"]) == (False, 1)
    assert (
        fields["missing"]
        == fields["stages"][0]["counters"].get(store.EVENTS_LOST, 0)
        + (fields["stages"][0]["dropped_events"])
    )


def test_an_unharmed_run_is_complete_and_prints_no_warning(profile_folder: Path) -> None:
    pipeline = profiled_two_stages()
    try:
        _forward(pipeline, 100)
        pipeline.stop_loop()
    finally:
        pipeline.cleanup()
    report = pipeline.get_profile_report()
    assert report is not None
    assert (report.complete, report.missing, report.writer_restarts) == (True, 0, 0)
    assert store.EVENTS_LOST not in report.stages[0].counters
    output = CliRunner().invoke(cli, ["profile", str(profile_folder / store.DB_FILENAME)]).output
    assert "warning" not in output
