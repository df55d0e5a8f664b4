"""End to end: a profiled parallel run with stages that sleep 5 ms and 10 ms as their work,
its live counters, its report, and the ``pystream profile`` / ``pystream top`` output."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import stages
from click.testing import CliRunner
from conftest import wait_until

import pystream_zmq
from pystream_zmq import Pipeline
from pystream_zmq.cli import profile as profile_cli
from pystream_zmq.cli.main import main as cli
from pystream_zmq.profiling import store
from pystream_zmq.profiling.report import ProfileReport

MAIN = "MainPipeline"
PATHS = [MAIN, f"{MAIN}__Sleep5", f"{MAIN}__Sleep10", f"{MAIN}__Fail"]
ITEMS = 40


def _counters(db: Path) -> dict[tuple[str, str], int]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT path, name, value FROM counters").fetchall()
    conn.close()
    return {(path, name): value for path, name, value in rows}


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Any]]:
    """(database, report) of one parallel run; the live checks happen while it runs."""
    folder = tmp_path_factory.mktemp("profiles")
    pystream_zmq.set_profiler_db_folder(folder)
    db = folder / store.DB_FILENAME
    pipeline = Pipeline(use_profiler=True)
    pipeline.add(stages.sleep_5ms, "Sleep5")
    pipeline.add(stages.sleep_10ms, "Sleep10")
    pipeline.add(stages.FailOn(bad=3), "Fail")
    try:
        pipeline.parallelize()
        for x in range(ITEMS):
            assert pipeline.forward({"x": x})
        # Live values arrive while the pipeline runs (snapshots every second), before cleanup.
        assert wait_until(
            lambda: (
                _counters(db).get((f"{MAIN}__Sleep10", "processed")) == ITEMS
                and _counters(db).get((MAIN, "delivered")) == ITEMS - 1
            ),
            timeout=10,
        ), _counters(db)
        live = CliRunner().invoke(cli, ["top", str(db), "--once", "--window", "60"])
    finally:
        pipeline.cleanup()
    yield db, (pipeline.get_profile_report(), live)
    store._db_folder = None  # private: PyStream's API sets the folder but has no reset


def test_report_shows_the_injected_delays(profiled_run: tuple[Path, Any]) -> None:
    result: ProfileReport = profiled_run[1][0]
    by_path = {stage.path: stage for stage in result.stages}
    assert list(by_path) == PATHS
    five, ten = by_path[f"{MAIN}__Sleep5"], by_path[f"{MAIN}__Sleep10"]
    assert five.items == ten.items == ITEMS
    assert 0.005 <= five.latency_p50 < 0.009
    assert 0.010 <= ten.latency_p50 < 0.014
    assert 0.003 < ten.latency_p50 - five.latency_p50 < 0.007
    assert five.compute_p95 == five.latency_p95  # a stage's latency is its compute
    assert ten.queue_wait_mean >= 0
    main = by_path[MAIN]
    assert main.items == ITEMS - 1 and main.latency_p50 > ten.latency_p50 + five.latency_p50
    assert main.counters["forwarded"] == ITEMS and main.counters["refused"] == 0
    assert main.errors == by_path[f"{MAIN}__Fail"].errors == 1
    assert by_path[f"{MAIN}__Fail"].counters["processed"] == ITEMS - 1


def test_top_once_shows_the_live_stages(profiled_run: tuple[Path, Any]) -> None:
    live = profiled_run[1][1]
    assert live.exit_code == 0, live.output
    shown = [line.split()[0] for line in live.output.splitlines() if line.strip()]
    assert shown[-4:] == [MAIN, "Sleep5", "Sleep10", "Fail"]  # the prefix is left out
    assert "items/s" in live.output


def test_top_refreshes_until_ctrl_c(
    profiled_run: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    frames = []

    def interrupt_on_second_wait(seconds: float) -> None:
        frames.append(seconds)
        if len(frames) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(profile_cli.time, "sleep", interrupt_on_second_wait)
    out = CliRunner().invoke(cli, ["top", str(profiled_run[0]), "--interval", "0.5"])
    assert out.exit_code == 0, out.output
    assert frames == [0.5, 0.5]
    assert [line.split()[0] for line in out.output.splitlines()].count("Sleep10") == 2


def test_profile_table_has_the_stage_names(profiled_run: tuple[Path, Any]) -> None:
    db = profiled_run[0]
    out = CliRunner().invoke(cli, ["profile", str(db)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert "times in ms" in lines[1] and "p95" in lines[2].split()
    # Below MainPipeline without its prefix, so that the table fits 100 columns.
    assert [line.split()[0] for line in lines[4:8]] == [MAIN, "Sleep5", "Sleep10", "Fail"]
    assert max(map(len, lines[1:])) <= 100, "\n".join(lines)
    # The workers' memory follows, in a table of its own: every stage here has a worker.
    assert (
        lines[8] == ""
        and "resident MB" in lines[9]
        and lines[10].split()[:3] == ["stage", "rss", "peak"]
    )
    assert [line.split()[0] for line in lines[12:]] == [MAIN, "Sleep5", "Sleep10", "Fail"]


def test_profile_json_has_percentiles_for_every_stage(profiled_run: tuple[Path, Any]) -> None:
    db = profiled_run[0]
    out = CliRunner().invoke(cli, ["profile", str(db), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert [stage["path"] for stage in data["stages"]] == PATHS
    for stage in data["stages"]:
        assert all(
            isinstance(stage[k], float) for k in ("latency_p50", "latency_p95", "latency_p99")
        )
    p50 = {stage["path"]: stage["latency_p50"] for stage in data["stages"]}
    assert 0.003 < p50[f"{MAIN}__Sleep10"] - p50[f"{MAIN}__Sleep5"] < 0.007


def test_profile_csv_parses(profiled_run: tuple[Path, Any]) -> None:
    db = profiled_run[0]
    out = CliRunner().invoke(cli, ["profile", str(db), "--csv", "--run", "1"])
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.output)))
    assert [row["path"] for row in rows] == PATHS
    assert float(rows[2]["latency_p50"]) >= 0.010


def test_profile_plot_writes_a_png(profiled_run: tuple[Path, Any], tmp_path: Path) -> None:
    png = tmp_path / "profile.png"
    out = CliRunner().invoke(cli, ["profile", str(profiled_run[0]), "--plot", str(png)])
    assert out.exit_code == 0, out.output
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert 10_000 < len(data) < 5_000_000


def test_plot_without_matplotlib_says_how_to_install(
    profiled_run: tuple[Path, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("matplotlib", "matplotlib.figure", "pystream_zmq.profiling.plot"):
        monkeypatch.setitem(sys.modules, module, None)  # None: importing it raises
    png = tmp_path / "profile.png"
    out = CliRunner().invoke(cli, ["profile", str(profiled_run[0]), "--plot", str(png)])
    assert out.exit_code == 1
    assert out.output.strip() == "Error: --plot needs matplotlib: pip install 'pystream-zmq[plot]'"
    assert not png.exists()


def test_default_db_is_the_profiler_folder(profiled_run: tuple[Path, Any]) -> None:
    pystream_zmq.set_profiler_db_folder(profiled_run[0].parent)
    out = CliRunner().invoke(cli, ["profile", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["run_id"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["profile", "{missing}"], "Error: no profile database at {missing}"),
        (["top", "{missing}", "--once"], "Error: no profile database at {missing}"),
        (["profile", "{db}", "--run", "999"], "Error: no run 999 in {db}"),
        (["top", "{db}", "--run", "999", "--once"], "Error: no run 999 in {db}"),
    ],
)
def test_clear_one_line_errors(
    profiled_run: tuple[Path, Any], tmp_path: Path, args: list[str], message: str
) -> None:
    names = {"missing": tmp_path / "nothing.sqlite3", "db": profiled_run[0]}
    out = CliRunner().invoke(cli, [arg.format(**names) for arg in args])
    assert out.exit_code == 1
    assert out.output.strip() == message.format(**names)


def test_json_and_csv_together_is_a_usage_error(profiled_run: tuple[Path, Any]) -> None:
    out = CliRunner().invoke(cli, ["profile", str(profiled_run[0]), "--json", "--csv"])
    assert out.exit_code == 2
    assert "cannot be combined" in out.output
