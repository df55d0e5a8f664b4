"""How the user's program ending, or printing, meets the worker processes: a stage's print()
reaches a file whole, and a program that forgets cleanup() still delivers what it forwarded."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import psutil
from conftest import wait_until
from test_seed_notebook import _env, alive

PRINTING = """
from pystream_zmq import Pipeline
def shout(data):
    print("item", data["x"])
    return data
with Pipeline() as pipeline:
    pipeline.add(shout)
    pipeline.parallelize()
    for x in range(ITEMS):
        assert pipeline.forward({"x": x})
    pipeline.stop_loop()
"""


def test_a_stage_print_reaches_a_file_whole(tmp_path: Path) -> None:
    """stdout is a file (logs, CI, nohup): every line a stage printed is there after exit."""
    items = 300
    script = tmp_path / "printing.py"
    script.write_text(PRINTING.replace("ITEMS", str(items)))
    out = tmp_path / "out.txt"
    env = {k: v for k, v in _env().items() if k != "PYTHONUNBUFFERED"}  # as a user has it
    with out.open("wb") as stdout:
        result = subprocess.run(
            [sys.executable, str(script)], stdout=stdout, stderr=subprocess.PIPE,
            timeout=60, env=env, cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert out.read_text().splitlines() == [f"item {x}" for x in range(items)]


FORGETFUL = """
import os, sys
from pystream_zmq import Pipeline, set_profiler_db_folder
set_profiler_db_folder(sys.argv[1])
def slow(data):
    import time
    time.sleep(0.02)
    return data
pipeline = Pipeline(use_profiler=True)
pipeline.add(slow)
pipeline.parallelize()
for x in range(20):
    assert pipeline.forward({"x": x})
print(" ".join(str(p) for p in [w.pid for w in pipeline.stats().workers]), flush=True)
"""


def test_a_program_that_forgets_cleanup_delivers_what_it_forwarded(tmp_path: Path) -> None:
    """The script ends with 20 items in flight and no cleanup(): they are delivered (the
    profile says so), one warning says cleanup() was not called, and no worker is left."""
    script = tmp_path / "forgetful.py"
    script.write_text(FORGETFUL)
    folder = tmp_path / "profiles"
    result = subprocess.run(
        [sys.executable, str(script), str(folder)], capture_output=True, text=True,
        timeout=60, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    workers = [psutil.Process(int(pid)) for pid in result.stdout.split() if _exists(int(pid))]
    assert wait_until(lambda: not any(map(alive, workers)), timeout=10)
    assert result.stderr.count("still running at exit") == 1, result.stderr
    assert "orchestrator has gone away" not in result.stderr
    with sqlite3.connect(folder / "profiles.sqlite3") as db:
        (delivered,) = db.execute(
            "SELECT value FROM counters WHERE path = 'MainPipeline' AND name = 'delivered'"
        ).fetchone()
        (events,) = db.execute("SELECT count(*) FROM events WHERE path = 'MainPipeline'").fetchone()
    db.close()
    assert (delivered, events) == (20, 20)


def _exists(pid: int) -> bool:
    return psutil.pid_exists(pid)
