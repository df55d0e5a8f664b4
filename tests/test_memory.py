"""Memory per worker is visible: a stage that keeps 20 MB per item shows a growing resident
size in stats(), the report, ``pystream profile`` and ``pystream top``; with
``max_memory_mb`` its worker is replaced after the item that passes it, logged and counted,
and the pipeline goes on with every item accounted for."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import wait_until

from pystream_zmq import Pipeline, Stage
from pystream_zmq.cli.main import main as cli
from pystream_zmq.errors import WorkerStartupError
from pystream_zmq.plan import Limits
from pystream_zmq.profiling import report, store
from pystream_zmq.profiling.store import ProfileWriter
from pystream_zmq.stage import MAIN_PIPELINE_NAME as MAIN
from pystream_zmq.stats import PipelineStats, WorkerStats
from pystream_zmq.wire import status
from pystream_zmq.worker.memory import Memory, unit_limit

MB = 2**20
LEAK_MB = 20
LEAK = f"{MAIN}__Leak"

_kept: list[Any] = []  # in the worker process: what Leak keeps (no attribute to copy back)


class Leak(Stage):
    """Keeps ``mb`` MiB per item (but those with ``"leak": False``), written, so resident."""

    def __init__(self, mb: int = LEAK_MB) -> None:
        self.mb = mb

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("leak", True):
            _kept.append(np.ones(self.mb * MB, np.uint8))
        return data

    def cleanup(self) -> None:
        pass


def leak_worker(stats: PipelineStats) -> WorkerStats:
    return next(w for w in stats.workers if w.name == LEAK)


def column(output: str, stage: str, name: str) -> str:
    """The cell of ``stage``'s row under the header ``name`` in a profile/top table."""
    lines = output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:1] == ["stage"] and name in line)
    head = lines[at].split()
    row = next(line.split() for line in lines[at:] if line.split()[:1] == [stage])
    return row[head.index(name)]


# -- visible -----------------------------------------------------------------------------------
def test_a_growing_resident_size_shows_in_stats_the_report_and_the_cli(
    profile_folder: Path,
) -> None:
    db = profile_folder / store.DB_FILENAME
    seen: list[WorkerStats] = []
    with Pipeline(use_profiler=True) as pipeline:
        pipeline.add(Leak(), "Leak")
        pipeline.parallelize()
        for delivered, items in ((1, 1), (5, 4)):
            for _ in range(items):
                assert pipeline.forward({"x": 0})
            assert wait_until(lambda: pipeline.stats().delivered == delivered)  # noqa: B023
            seen.append(leak_worker(pipeline.stats()))
        after_one, after_five = seen
        assert after_one.rss_bytes is not None and after_five.rss_bytes is not None
        assert after_one.rss_bytes > 10 * MB  # an interpreter with numpy and zmq at least
        assert after_five.rss_bytes - after_one.rss_bytes >= 4 * LEAK_MB * MB * 0.9
        assert after_five.rss_peak_bytes is not None
        assert after_five.rss_peak_bytes >= after_five.rss_bytes
        assert after_five.pid == after_one.pid and after_five.restarts == 0
        assert after_five.restart_reasons == {}

        def leak_row() -> report.StageReport:
            result = pipeline.get_profile_report()
            assert result is not None
            return result.stages[1]

        # The workers' counters reach the database every second.
        grown = after_five.rss_bytes - 5 * MB
        assert wait_until(lambda: (leak_row().rss_bytes or 0) >= grown)
        runner = CliRunner()
        top = runner.invoke(cli, ["top", str(db), "--once"])  # live
    result = pipeline.get_profile_report()  # after cleanup: the final counters
    assert result is not None
    main, leak = result.stages
    assert leak.path == LEAK and leak.rss_bytes is not None and leak.rss_peak_bytes is not None
    assert leak.rss_bytes >= grown and leak.rss_peak_bytes >= leak.rss_bytes
    assert (main.rss_bytes, main.rss_peak_bytes) == (leak.rss_bytes, leak.rss_peak_bytes)
    assert leak.counters[store.RSS] == leak.rss_bytes and leak.memory_restarts == 0
    profile = runner.invoke(cli, ["profile", str(db)])
    assert profile.exit_code == 0 and top.exit_code == 0, profile.output + top.output
    assert int(column(profile.output, "Leak", "peak")) == round(leak.rss_peak_bytes / MB)
    assert max(map(len, profile.output.splitlines()[1:])) <= 100, profile.output
    assert int(column(top.output, "Leak", "rss")) >= grown / MB
    assert int(column(top.output, "Leak", "peak")) >= grown / MB
    assert column(profile.output, "Leak", "replaced") == "0"


# -- limited -----------------------------------------------------------------------------------
def test_a_worker_past_max_memory_is_replaced_and_the_pipeline_goes_on(
    caplog: pytest.LogCaptureFixture, profile_folder: Path
) -> None:
    """max_restarts=0: a memory restart is the limit at work, not a failure."""
    caplog.set_level(logging.INFO, logger="pystream_zmq")
    limit = 150  # a worker's own size is some 60 MB
    with Pipeline(use_profiler=True) as pipeline:
        pipeline.add(Leak(), "Leak", max_memory_mb=limit)
        pipeline.parallelize(max_restarts=0, drain_timeout=20)
        first_pid = leak_worker(pipeline.stats()).pid
        for x in range(12):  # 240 MB kept: past the limit
            assert pipeline.forward({"x": x})
        assert wait_until(lambda: leak_worker(pipeline.stats()).restarts >= 1, timeout=15)
        pipeline.stop_loop()  # drains: every item is out or counted lost
        # The worker now running may have taken enough of the 12 to be replaced in turn.
        assert wait_until(lambda: (leak_worker(pipeline.stats()).rss_bytes or 2**62) < limit * MB)
        before = pipeline.stats()
        # What was queued in a worker replaced, if anything, is counted lost.
        assert before.forwarded == before.delivered + before.dropped + before.lost == 12
        for x in range(12, 14):  # the pipeline goes on
            assert pipeline.forward({"x": x, "leak": False})
        pipeline.stop_loop()
        after = pipeline.stats()
        worker = leak_worker(after)
    assert after.delivered == before.delivered + 2 and after.lost == before.lost
    assert worker.pid != first_pid and worker.alive
    assert worker.restart_reasons == {"max_memory": worker.restarts}, worker
    assert worker.rss_bytes is not None and worker.rss_bytes < limit * MB
    # Logged with the resident size and the limit, by the status board and the supervisor.
    found = re.findall(
        r"stage MainPipeline__Leak: its resident memory, (\d+) MB, passed max_memory_mb=150 "
        r"after item (\d+); its worker is replaced",
        caplog.text,
    )
    assert len(found) == worker.restarts, caplog.text
    assert all(int(mb) > limit for mb, _ in found), found
    assert "with exit code -9; replaced in 0.1 s (max_memory restart 1)" in caplog.text
    assert "was ended (stage MainPipeline__Leak: its resident memory" in caplog.text
    # ... and counted in the profiles, under the worker's path.
    result = report.build_report(profile_folder / store.DB_FILENAME)
    assert result.stages[1].memory_restarts == result.stages[0].memory_restarts == worker.restarts
    shown = CliRunner().invoke(cli, ["profile", str(profile_folder / store.DB_FILENAME)])
    assert column(shown.output, "Leak", "replaced") == str(worker.restarts)


def test_a_limit_under_the_size_at_start_is_refused_at_once() -> None:
    pipeline = Pipeline()
    pipeline.add(Leak(), "Leak", max_memory_mb=1)
    with pytest.raises(WorkerStartupError, match=r"already over max_memory_mb=1\b") as caught:
        pipeline.parallelize()
    assert caught.value.stage == LEAK


# -- pure --------------------------------------------------------------------------------------
def test_memory_is_read_from_this_process() -> None:
    meter = Memory()
    before = meter.read()
    block = np.ones(50 * MB, np.uint8)  # written: resident
    after = meter.read()
    assert block[-1] == 1
    assert after - before >= 45 * MB
    counters = meter.counters()
    assert counters[store.RSS] >= after - 5 * MB and counters[store.RSS_PEAK] >= after
    assert not meter.over_limit()  # no limit: never read for it
    assert Memory(limit=MB).over_limit()


def test_max_memory_mb_is_checked_and_inherited() -> None:
    for bad in (0, -5, "big", True):
        with pytest.raises(ValueError, match="max_memory_mb"):
            Pipeline().add(Leak(), "L", max_memory_mb=bad)  # type: ignore[arg-type]
    child = Pipeline()
    child.add(Leak(), "A")
    child.add(Leak(), "B", max_memory_mb=100)
    child.serialize()
    try:
        parent = Pipeline()
        parent.add(child.as_stage(), "Child", max_memory_mb=300)
        (unit,) = parent.plan().units
    finally:
        child.cleanup()
    by_path = unit.limits_by_path()
    assert by_path[f"{MAIN}__Child__A"].max_memory_bytes() == 300 * MB
    assert unit_limit(by_path.values()) == 100 * MB  # one worker runs both: the smaller
    assert Limits().max_memory_bytes() == math.inf


def test_a_memory_report_travels_on_the_status_link() -> None:
    sent = status.Report(2, 123, LEAK, 7, 130.0 * MB, False, 120.0 * MB)
    assert status.unpack(status.pack(status.MEMORY, sent)) == (status.MEMORY, sent)


def test_the_report_sums_replicas_and_takes_the_highest_peak(tmp_path: Path) -> None:
    db = tmp_path / "profiles.sqlite3"
    writer = ProfileWriter(db)
    try:
        run_id = writer.start_run(MAIN, "parallel", [(MAIN, "pipeline"), (LEAK, "stage")])
        writer.submit_counters(
            run_id,
            {
                f"{LEAK}#0": {store.RSS: 100 * MB, store.RSS_PEAK: 300 * MB},
                f"{LEAK}#1": {store.RSS: 50 * MB, store.RSS_PEAK: 90 * MB},
            },
        )
        writer.submit_counters(run_id, {f"{LEAK}#0": {store.MEMORY_RESTARTS: 2}})
        assert writer.flush(10)
    finally:
        writer.close()
    main, leak = report.build_report(db).stages
    assert (leak.rss_bytes, leak.rss_peak_bytes, leak.memory_restarts) == (150 * MB, 300 * MB, 2)
    assert (main.rss_bytes, main.rss_peak_bytes, main.memory_restarts) == (150 * MB, 300 * MB, 2)
    assert leak.to_dict()["rss_bytes"] == 150 * MB
