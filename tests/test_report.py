"""Pure tests of schema 2 (counters, retention, migration from 1) and of the profile report,
on databases built from known events: no processes."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import stages

from pystream_zmq import Pipeline
from pystream_zmq.profiling import report, store
from pystream_zmq.profiling.store import ProfileWriter
from pystream_zmq.stage import MAIN_PIPELINE_NAME, Event

MAIN = MAIN_PIPELINE_NAME
A, B = f"{MAIN}__A", f"{MAIN}__B"
CHILD, CX, CY = f"{MAIN}__Child", f"{MAIN}__Child__X", f"{MAIN}__Child__Y"
T0 = 1000.0


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "profiles.sqlite3"


@pytest.fixture
def writer(db: Path) -> Iterator[ProfileWriter]:
    writer = ProfileWriter(db)
    yield writer
    writer.close()


def chain_events(n: int, hops: list[tuple[str, float, float]], period: float = 0.1) -> list[Event]:
    """Item i is sent at T0 + i * period; for each (path, wait, compute) it waits, then
    computes; MainPipeline's event spans from sending to the last stage's end plus 1 ms."""
    result: list[Event] = []
    for seq in range(n):
        sent = t = T0 + seq * period
        for path, wait, compute in hops:
            start = t + wait
            result.append((path, seq, start - wait / 2, start, start + compute))
            t = start + compute
        result.append((MAIN, seq, sent, sent, t + 0.001))
    return result


def test_report_splits_queue_wait_from_compute(writer: ProfileWriter, db: Path) -> None:
    run_id = writer.start_run(MAIN, "parallel", [(MAIN, "pipeline"), (A, "stage"), (B, "stage")])
    writer.submit(run_id, chain_events(11, [(A, 0.002, 0.005), (B, 0.003, 0.010)]))
    writer.submit_counters(run_id, {MAIN: {"forwarded": 12, "refused": 2, "delivered": 11}})
    writer.submit_counters(run_id, {B: {"stage_errors": 1, "decode_errors": 1}})
    assert writer.flush(10)

    result = report.build_report(db)  # the latest run
    assert result.run_id == run_id and result.mode == "parallel"
    main, a, b = result.stages
    assert [s.path for s in result.stages] == [MAIN, A, B]
    assert [s.items for s in result.stages] == [11, 11, 11]
    for stage, wait, compute in ((a, 0.002, 0.005), (b, 0.003, 0.010)):
        for value in (stage.latency_mean, stage.latency_p50, stage.latency_p95, stage.latency_p99):
            assert value == pytest.approx(compute, abs=1e-9)
        assert stage.queue_wait_mean == pytest.approx(wait, abs=1e-9)  # from the previous end
        assert stage.compute_p95 == pytest.approx(compute, abs=1e-9)
        assert stage.throughput == pytest.approx(10.0)
    assert main.latency_p50 == pytest.approx(0.021, abs=1e-9)
    assert main.compute_mean == pytest.approx(0.015, abs=1e-9)  # the sum of its stages'
    assert main.queue_wait_mean == pytest.approx(0.006, abs=1e-9)  # the rest
    assert (main.dropped, main.errors, b.errors, a.errors) == (2, 2, 2, 0)
    assert main.counters == {"forwarded": 12, "refused": 2, "delivered": 11}
    as_dict = result.to_dict()
    assert as_dict["stages"][1]["latency_p99"] == pytest.approx(0.005)


def test_percentiles_of_a_known_distribution(writer: ProfileWriter, db: Path) -> None:
    run_id = writer.start_run(MAIN, "serial", [(MAIN, "pipeline"), (A, "stage")])
    # compute times 1..100 ms: p50 = 50.5, p95 = 95.05, p99 = 99.01 (linear interpolation)
    writer.submit(run_id, [(A, i, T0 + i, T0 + i, T0 + i + (i + 1) / 1000) for i in range(100)])
    assert writer.flush(10)
    (_, a) = report.build_report(db, run_id).stages
    assert (a.latency_p50, a.latency_p95, a.latency_p99) == pytest.approx(
        (0.0505, 0.09505, 0.09901), abs=1e-9
    )
    assert a.latency_mean == pytest.approx(0.0505, abs=1e-9)
    assert a.queue_wait_mean == pytest.approx(0.0)  # no MainPipeline event: from arrival


def test_child_pipeline_spans_its_stages(writer: ProfileWriter, db: Path) -> None:
    layout = [(MAIN, "pipeline"), (CHILD, "pipeline"), (CX, "stage"), (CY, "stage")]
    run_id = writer.start_run(MAIN, "parallel", layout)
    writer.submit(run_id, chain_events(5, [(CX, 0.004, 0.002), (CY, 0.001, 0.003)]))
    assert writer.flush(10)
    stages = {s.path: s for s in report.build_report(db, run_id).stages}
    assert list(stages) == [MAIN, CHILD, CX, CY]
    child = stages[CHILD]
    assert child.items == 5
    assert child.latency_mean == pytest.approx(0.006, abs=1e-9)  # X's start to Y's end
    assert child.compute_mean == pytest.approx(0.005, abs=1e-9)
    assert child.queue_wait_mean == pytest.approx(0.001, abs=1e-9)
    assert stages[CX].queue_wait_mean == pytest.approx(0.004, abs=1e-9)  # from the send


def test_empty_stage_and_window(writer: ProfileWriter, db: Path) -> None:
    run_id = writer.start_run(MAIN, "parallel", [(MAIN, "pipeline"), (A, "stage"), (B, "stage")])
    writer.submit(run_id, [(A, i, T0 + i, T0 + i, T0 + i + 0.01) for i in range(10)])
    assert writer.flush(10)
    main, a, b = report.build_report(db, run_id, since=T0 + 7).stages
    assert a.items == 3 and b.items == 0
    assert main.items == 3  # no events of its own: one span per item over its stages
    assert math.isnan(b.latency_p95) and b.to_dict()["latency_p95"] is None
    assert math.isnan(b.throughput)


def test_missing_db_and_unknown_run(db: Path, writer: ProfileWriter) -> None:
    with pytest.raises(report.ProfileNotFoundError, match="no profile database"):
        report.build_report(db)
    writer.start_run(MAIN, "serial", [(MAIN, "pipeline")])
    with pytest.raises(report.ProfileNotFoundError, match="no run 42"):
        report.build_report(db, 42)


# -- schema ----------------------------------------------------------------------------------
_V1 = (
    "CREATE TABLE runs (run_id INTEGER PRIMARY KEY AUTOINCREMENT, pipeline TEXT NOT NULL,"
    " mode TEXT NOT NULL, started REAL NOT NULL, pid INTEGER NOT NULL)",
    "CREATE TABLE stages (run_id INTEGER NOT NULL REFERENCES runs, position INTEGER NOT NULL,"
    " path TEXT NOT NULL, kind TEXT NOT NULL, PRIMARY KEY (run_id, path))",
    "CREATE TABLE events (run_id INTEGER NOT NULL, path TEXT NOT NULL, seq INTEGER NOT NULL,"
    ' arrive REAL, start REAL NOT NULL, "end" REAL NOT NULL)',
    "CREATE INDEX events_run_path ON events (run_id, path)",
    "INSERT INTO runs VALUES (1, 'MainPipeline', 'serial', 1000.0, 1)",
    "INSERT INTO stages VALUES (1, 0, 'MainPipeline', 'pipeline'), (1, 1, 'MainPipeline__A',"
    " 'stage')",
    "INSERT INTO events VALUES (1, 'MainPipeline__A', 0, 1000.0, 1000.0, 1000.5),"
    " (1, 'MainPipeline__A', 1, 1001.0, 1001.0, 1001.5)",
    "PRAGMA user_version = 1",
)


def test_a_version_1_database_reads_and_migrates(db: Path, writer: ProfileWriter) -> None:
    with sqlite3.connect(db) as conn:
        for statement in _V1:
            conn.execute(statement)
    conn.close()
    old = report.build_report(db)  # read as it is
    assert old.stages[1].items == 2 and old.stages[1].latency_p50 == pytest.approx(0.5)
    assert old.stages[1].counters == {}

    run_id = writer.start_run(MAIN, "serial", [(MAIN, "pipeline")])
    writer.submit_counters(run_id, {MAIN: {"forwarded": 3}})
    assert writer.flush(10)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
    conn.close()
    assert run_id == 2
    assert report.build_report(db, 1).stages[1].items == 2  # the old run is still there
    assert report.build_report(db).stages[0].counters == {"forwarded": 3}


def test_counters_keep_the_latest_snapshot(writer: ProfileWriter, db: Path) -> None:
    run_id = writer.start_run(MAIN, "parallel", [(MAIN, "pipeline"), (A, "stage")])
    for n in range(5):
        writer.submit_counters(run_id, {A: {"processed": n, "stage_errors": 0}})
        assert writer.flush(10)
    assert report.build_report(db).stages[1].counters == {"processed": 4, "stage_errors": 0}


def test_retention_keeps_the_newest_runs(
    db: Path, writer: ProfileWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(store.KEEP_RUNS_ENV, "3")  # read at call time
    for _ in range(5):
        run_id = writer.start_run(MAIN, "parallel", [(MAIN, "pipeline"), (A, "stage")])
        writer.submit(run_id, [(A, 0, T0, T0, T0 + 1)])
        writer.submit_counters(run_id, {A: {"processed": 1}})
        assert writer.flush(10)
    with sqlite3.connect(db) as conn:
        for table in ("runs", "stages", "events", "counters"):
            runs = conn.execute(f"SELECT DISTINCT run_id FROM {table} ORDER BY run_id")
            assert [r for (r,) in runs] == [3, 4, 5], table
    conn.close()


def test_keep_runs_default_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(store.KEEP_RUNS_ENV, raising=False)
    assert store.keep_runs() == store.DEFAULT_KEEP_RUNS == 100
    for bad in ("0", "many"):
        monkeypatch.setenv(store.KEEP_RUNS_ENV, bad)
        with pytest.raises(ValueError, match=store.KEEP_RUNS_ENV):
            store.keep_runs()


def test_serial_pipeline_report_counts_items_and_errors() -> None:
    with Pipeline(use_profiler=True) as pipeline:
        pipeline.add(stages.FailOn(bad=2), "Fail")
        pipeline.add(stages.add_one, "AddOne")
        pipeline.serialize()
        for x in range(5):
            pipeline.forward({"x": x})
        result = pipeline.get_profile_report()
    assert result is not None
    main, fail, add_one = result.stages
    assert (main.items, fail.items, add_one.items) == (4, 4, 4)
    assert main.counters == {"forwarded": 5, "delivered": 4, "dropped_events": 0}
    assert (fail.errors, add_one.errors, main.errors) == (1, 0, 1)
    assert Pipeline().get_profile_report() is None
