"""Profile runs: each is named (the script, ``run_name=``, ``--run-name``), a pipeline run
as another's child is part of the parent's run, and ``pystream profile --list`` lists them."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import stages
from click.testing import CliRunner

from pystream_zmq import Pipeline
from pystream_zmq.cli.main import main as cli
from pystream_zmq.profiling.store import DB_FILENAME
from pystream_zmq.profiling.summary import read_profiles

REPO = Path(__file__).resolve().parent.parent
JOB = """
import sys
from pystream_zmq import Pipeline, set_profiler_db_folder
set_profiler_db_folder(sys.argv[1])
with Pipeline(use_profiler=True, **eval(sys.argv[2])) as pipeline:
    pipeline.add(lambda data: data, "Echo")
    pipeline.serialize()
    for x in range(3):
        pipeline.forward({"x": x})
"""


def runs(db: Path) -> list[tuple[int, str]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT run_id, pipeline FROM runs ORDER BY run_id").fetchall()


def list_json(db: Path) -> list[dict[str, object]]:
    result = CliRunner().invoke(cli, ["profile", str(db), "--list", "--json"])
    assert result.exit_code == 0, result.output
    listed: list[dict[str, object]] = json.loads(result.output)
    return listed


def test_a_run_is_named_after_the_script_unless_given_a_name(
    tmp_path: Path, profile_folder: Path
) -> None:
    (tmp_path / "my_job.py").write_text(JOB)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "__main__.py").write_text(JOB)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    folder = str(profile_folder)
    for command in (
        [str(tmp_path / "my_job.py"), folder, "{}"],
        [str(tmp_path / "my_job.py"), folder, "{'run_name': 'nightly'}"],
        ["-m", "jobs", folder, "{}"],
        ["-c", JOB, folder, "{}"],  # no script: PyStream's name
    ):
        done = subprocess.run(
            [sys.executable, *command], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
    db = profile_folder / DB_FILENAME
    listed = list_json(db)
    assert [run["name"] for run in listed] == ["my_job", "nightly", "jobs", "MainPipeline"]
    assert [run["items"] for run in listed] == [3, 3, 3, 3]
    for run in listed:  # the name is the run's; the profile keys stay PyStream's
        latency, _ = read_profiles(db, int(str(run["run_id"])))
        assert list(latency) == ["MainPipeline", "MainPipeline__Echo"]


@pytest.mark.parametrize("name", ["", "  ", 3])
def test_a_run_name_must_be_a_non_empty_str(name: object) -> None:
    with pytest.raises(ValueError, match="run name must be a non-empty str"):
        Pipeline(run_name=name)  # type: ignore[arg-type]


@pytest.mark.parametrize("child_mode", ["serialize", "parallelize"])
def test_a_child_pipeline_is_part_of_its_parents_run(child_mode: str, profile_folder: Path):
    child = Pipeline(use_profiler=True)
    child.add(stages.add_one, "StageA")
    getattr(child, child_mode)()  # registers a run of its own, for a start
    parent = Pipeline(use_profiler=True, run_name="parent")
    parent.add(stages.add_one, "Stage1")
    parent.add(child.as_stage(), "Child")
    with parent:
        parent.parallelize(block_output=True)
        for x in range(5):
            assert parent.forward({"x": x})
            assert parent.get_results() == {"x": x + 2}
    db = profile_folder / DB_FILENAME
    assert [name for _, name in runs(db)] == ["parent"]
    report = parent.get_profile_report()
    assert report is not None
    assert {stage.path: stage.items for stage in report.stages} == {
        "MainPipeline": 5,
        "MainPipeline__Stage1": 5,
        "MainPipeline__Child": 5,
        "MainPipeline__Child__StageA": 5,
    }
    assert child.get_profiles() == ({}, {})


def test_a_child_that_ran_items_of_its_own_keeps_its_run(profile_folder: Path) -> None:
    child = Pipeline(use_profiler=True, run_name="child")
    child.add(stages.add_one, "StageA")
    child.serialize()
    child.forward({"x": 0})
    parent = Pipeline(use_profiler=True, run_name="parent")
    parent.add(child.as_stage(), "Child")
    with parent:
        parent.serialize()
        parent.forward({"x": 0})
    listed = list_json(profile_folder / DB_FILENAME)
    assert [(run["name"], run["items"]) for run in listed] == [("child", 1), ("parent", 1)]


def test_profile_list_fits_100_columns(profile_folder: Path) -> None:
    names = ["short", "a-very-long-run-name-" * 8]
    for name in names:
        with Pipeline(use_profiler=True, run_name=name) as pipeline:
            pipeline.add(stages.add_one, "StageA")
            pipeline.serialize()
            for x in range(4):
                pipeline.forward({"x": x})
    db = profile_folder / DB_FILENAME
    result = CliRunner().invoke(cli, ["profile", str(db), "--list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["run", "name", "mode", "started", "duration", "items"]
    assert all(len(line) <= 100 for line in lines), lines
    rows = [line.split() for line in lines[2:]]
    assert [row[0] for row in rows] == ["1", "2"]
    assert rows[0][1] == "short" and rows[1][1].endswith("...")
    assert all(row[2] == "serial" and row[-1] == "4" for row in rows)
    assert all(row[-2] == "s" and float(row[-3]) >= 0 for row in rows), lines  # "0.1 s"

    listed = list_json(db)
    assert [run["name"] for run in listed] == names  # JSON keeps the whole name
    assert all(isinstance(run["duration"], float) and run["items"] == 4 for run in listed)
    assert all(
        set(run) == {"run_id", "name", "mode", "started", "duration", "items"} for run in listed
    )


def test_profile_list_refuses_what_it_does_not_take(tmp_path: Path) -> None:
    db = tmp_path / "none.sqlite3"
    missing = CliRunner().invoke(cli, ["profile", str(db), "--list"])
    assert missing.exit_code == 1 and f"no profile database at {db}" in missing.output
    for extra in (["--run", "1"], ["--csv"]):
        result = CliRunner().invoke(cli, ["profile", str(db), "--list", *extra])
        assert result.exit_code == 2 and "--list takes no --run, --csv or --plot" in result.output


def test_procfile_run_name() -> None:
    args = ["procfile", "services.demo:seed_pipeline", "--run-name", "nightly"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    header, *lines = result.output.splitlines()
    assert header.endswith("--run-name nightly")  # the command, to generate it again
    assert "--run-name nightly --stages" in lines[-1]
