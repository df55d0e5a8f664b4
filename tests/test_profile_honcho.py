"""Profiles of a pipeline run under honcho agree with what its workers logged: every item
each stage processed is in the database, its counters are its final ones, what a stop let go
is counted where it happened, and a sink that cannot start registers no run."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import stages
from click.testing import CliRunner
from conftest import wait_until
from test_worker_cli import (  # the fixtures honcho_env and run_honcho come along
    BIN,
    Honcho,
    free_port,
    free_port_range,
    honcho_env,
    received,
    run_honcho,
    stopped_after,
    stopped_codes,
)

from pystream_zmq import Pipeline
from pystream_zmq.cli import main as cli
from pystream_zmq.cli import worker as worker_cli
from pystream_zmq.cli.sink_role import ProfileTarget
from pystream_zmq.profiling import report
from pystream_zmq.profiling.store import DB_FILENAME

__all__ = ["honcho_env", "run_honcho"]  # fixtures, imported for pytest to find

STAGES = ["A", "B", "C"]


def backlogged_pipeline_definition() -> Pipeline:
    """A source ten times faster than its stages (0.1 s of work per item each): at a stop,
    the first stage holds a backlog that its drain cannot finish."""
    pipeline = Pipeline(input_generator=stages.counting, use_profiler=True)
    for name in STAGES:
        pipeline.add(stages.Sleep(0.1), name)
    return pipeline


def final_lines(output: str, process: str) -> tuple[int, int, int]:
    """What a stage logged as it stopped: (items processed, items dropped at the stop that
    were still queued at its input, processed items the next process did not take)."""
    found = re.search(
        rf"{process}\.1 .* stopped after (\d+) items \(\d+ stage errors(?:, (\d+) dropped at)?",
        output,
    )
    assert found, output
    processed, dropped = int(found.group(1)), int(found.group(2) or 0)
    if not dropped:
        return processed, 0, 0
    split = re.search(
        rf"{process}\.1 .* dropped {dropped} items at the stop \((\d+) still queued at the "
        rf"input, (\d+) the next process did not take\)",
        output,
    )
    assert split, output
    return processed, int(split.group(1)), int(split.group(2))


def stored(db: Path) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """(events per path, counters per path) of the database's only run."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
        events = dict(conn.execute("SELECT path, count(*) FROM events GROUP BY path").fetchall())
        counters: dict[str, dict[str, int]] = {}
        for path, name, value in conn.execute("SELECT path, name, value FROM counters"):
            counters.setdefault(path, {})[name] = value
    return events, counters


def test_the_database_agrees_with_the_workers_last_log_lines(
    run_honcho: Callable[[Path], Honcho], tmp_path: Path
) -> None:
    base = free_port_range(1 + len(STAGES) + 1)
    procfile = tmp_path / "Procfile"
    args = ["procfile", "test_profile_honcho:backlogged_pipeline_definition", "--period", "0.01"]
    result = CliRunner().invoke(cli.main, [*args, "--base-port", str(base), "-o", str(procfile)])
    assert result.exit_code == 0, result.output
    honcho = run_honcho(procfile)
    assert wait_until(lambda: received(honcho) >= 20, timeout=60, interval=0.1), honcho.output()

    stop_started = time.monotonic()
    assert honcho.stop() == 128 + signal.SIGTERM
    assert time.monotonic() - stop_started < 5.0  # before honcho's SIGKILL
    output = honcho.output()
    assert stopped_codes(output) == dict.fromkeys(["source", *STAGES, "sink"], 0), output
    assert "SIGKILL" not in output and "did not send their last records" not in output

    db = tmp_path / "profiles" / DB_FILENAME
    events, counters = stored(db)
    run = report.build_report(db)
    by_path = {stage.path: stage for stage in run.stages}
    sent, delivered = stopped_after(output, "source"), stopped_after(output, "sink")
    assert sent and delivered, output
    logged = {name: final_lines(output, name) for name in STAGES}

    # The sink's items: its log line, its events, its final counters.
    main = "MainPipeline"
    assert events[main] == counters[main]["delivered"] == int(delivered.group(1)) > 0
    assert by_path[main].items == int(delivered.group(1))
    for name, (processed, queued, unsent) in logged.items():
        path = f"{main}__{name}"
        assert events[path] == counters[path]["processed"] == processed, (name, output)
        dropped = queued + unsent
        assert counters[path]["discarded"] == by_path[path].dropped == dropped, (name, output)
    assert by_path[main].dropped == sum(queued + unsent for _, queued, unsent in logged.values())
    assert logged["A"][1] > 0  # the backlog was dropped, and counted

    # Nothing vanished unseen: what each process sent, the next processed or dropped.
    passed_on = int(sent.group(1))
    for name in STAGES:
        processed, queued, unsent = logged[name]
        assert passed_on == processed + queued, (name, output)
        passed_on = processed - unsent
    assert passed_on == int(delivered.group(1))


def test_a_sink_that_cannot_bind_registers_no_run(honcho_env: dict[str, str]) -> None:
    profiles = Path(honcho_env["PYSTREAM_PROFILE_DIR"])
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        for pull, profile in [(port, free_port()), (free_port(), port)]:
            done = subprocess.run(
                [BIN / "pystream-worker", "sink", "--pull", f"tcp://127.0.0.1:{pull}",
                 "--profile-pull", f"tcp://127.0.0.1:{profile}", "--stages", "A"],
                capture_output=True, text=True, timeout=60, env=honcho_env,
            )  # fmt: skip
            assert done.returncode == worker_cli.EXIT_ADDRESS, done.stderr
            assert "Address already in use" in done.stderr
    db = profiles / DB_FILENAME
    if db.exists():
        with contextlib.closing(sqlite3.connect(db)) as conn:
            assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 0


def test_the_sinks_layout_has_every_sub_pipeline_level(tmp_path: Path) -> None:
    """`pystream-worker pipeline --name Vision` records its counters under
    MainPipeline__Vision, which the sink registers even when --stages lists only its
    stages."""
    target = ProfileTarget(tmp_path / DB_FILENAME, "run", ["Pre", "Vision__Blur", "Vision__Edges"])
    assert target.layout() == [
        ("MainPipeline", "pipeline"),
        ("MainPipeline__Pre", "stage"),
        ("MainPipeline__Vision", "pipeline"),
        ("MainPipeline__Vision__Blur", "stage"),
        ("MainPipeline__Vision__Edges", "stage"),
    ]
