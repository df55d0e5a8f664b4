"""The seed notebook's code, with only its import line changed, run the two ways users run
it: as a plain script (no main guard) and cell by cell inside a Jupyter kernel."""

from __future__ import annotations

import contextlib
import queue
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import wait_until

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"
SEED_KEYS = [
    ["MainPipeline", *(f"MainPipeline__Stage{i}" for i in range(1, 6))],
    ["MainPipeline", *(f"MainPipeline__Stage{i}" for i in range(1, 6))],
    [
        "MainPipeline",
        "MainPipeline__StageA",
        "MainPipeline__StageB",
        "MainPipeline__Stage_1",
        "MainPipeline__Stage_2",
    ],
    [
        "MainPipeline",
        "MainPipeline__Stage1",
        "MainPipeline__Stage2",
        "MainPipeline__ChildPipeline",
        "MainPipeline__ChildPipeline__StageA",
        "MainPipeline__ChildPipeline__StageB",
    ],
]


def check_seed_output(output: str) -> None:
    """The notebook's printed results: shapes, counts, resets and exactly its profile keys."""
    assert output.count("Last output shape:\n(480, 720, 3)") == 4, output
    counts = [int(n) for n in re.findall(r"Number of processed data:\n(\d+)", output)]
    assert len(counts) == 2 and counts[0] > 0, output
    assert counts[1] >= counts[0], f"parallel processed fewer items than serial: {counts}"
    assert output.count("Data counter was reset to 0.") == 2, output
    table_pattern = r"Pipeline profile:\n.*?\n-+.*?\n((?:MainPipeline\S* +\S+ +\S+\n?)+)"
    tables = re.findall(table_pattern, output)
    keys = [[line.split()[0] for line in table.strip().splitlines()] for table in tables]
    assert keys == SEED_KEYS, output
    for table in tables:
        for line in table.strip().splitlines():
            _, latency, throughput = line.split()
            assert float(latency) > 0 and float(throughput) > 0, line


@pytest.mark.timeout(300)  # the whole seed demo: 30 s alone, 90 s on a busy machine
def test_seed_notebook_as_a_plain_script(tmp_path: Path) -> None:
    env_dir = tmp_path / "profiles"
    result = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=300,
        cwd=tmp_path, env={**_env(), "PYSTREAM_PROFILE_DIR": str(env_dir)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    check_seed_output(result.stdout)
    # One run per profile table, named after the script (the serialized child pipeline is
    # part of its parent's run), each with the items that went through it.
    with contextlib.closing(sqlite3.connect(env_dir / "profiles.sqlite3")) as conn:
        runs = conn.execute(
            "SELECT pipeline, (SELECT count(*) FROM events e WHERE e.run_id = r.run_id"
            " AND e.path = 'MainPipeline') FROM runs r ORDER BY run_id"
        ).fetchall()
    assert [name for name, _ in runs] == ["demo"] * len(SEED_KEYS), runs
    assert all(items > 0 for _, items in runs), runs


def test_a_script_without_main_guard_defining_its_stages(tmp_path: Path) -> None:
    script = tmp_path / "pasted_cells.py"
    script.write_text(
        "import os\n"
        "from pystream_zmq import Pipeline, Stage\n"
        "class Tag(Stage):\n"
        "    def __init__(self): self.seen = 0\n"
        "    def __call__(self, data):\n"
        "        self.seen += 1\n"
        "        return data + [os.getpid()]\n"
        "    def cleanup(self): pass\n"
        "def twice(data): return data + data\n"
        "tag = Tag()\n"
        "pipeline = Pipeline()\n"
        "pipeline.add(tag)\n"
        "pipeline.add(twice)\n"
        "pipeline.parallelize(block_output=True)\n"
        "pipeline.forward([os.getpid()])\n"
        "out = pipeline.get_results()\n"
        "pipeline.stop_loop()\n"
        "print('OUT', out[0] == os.getpid(), out[1] != os.getpid(), len(out), tag.seen)\n"
        "pipeline.cleanup()\n"
    )
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OUT True True 4 1"


@pytest.mark.timeout(300)  # the whole seed demo: 30 s alone, 90 s on a busy machine
def test_seed_notebook_in_a_jupyter_kernel(tmp_path: Path) -> None:
    jupyter_client = pytest.importorskip("jupyter_client")
    manager, client = jupyter_client.manager.start_new_kernel(
        kernel_name="python3", cwd=str(tmp_path),
        env={**_env(), "PYSTREAM_PROFILE_DIR": str(tmp_path / "profiles")},
    )  # fmt: skip
    kernel = psutil.Process(manager.provisioner.process.pid)
    workers: list[psutil.Process] = []
    try:
        output = []
        for cell in _cells(DEMO.read_text()):
            msg_id = client.execute(cell)
            while True:
                try:
                    msg = client.get_iopub_msg(timeout=120)
                except queue.Empty:
                    pytest.fail(f"kernel went silent in cell:\n{cell}")
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    output.append(content["text"])
                elif kind == "error":
                    pytest.fail("\n".join(content["traceback"]))
                elif kind == "status" and content["execution_state"] == "idle":
                    break
            workers += [p for p in kernel.children(recursive=True) if p not in workers]
        check_seed_output("".join(output))
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=False)
    assert workers, "the notebook's parallel pipelines started no worker processes"
    assert wait_until(lambda: not any(map(alive, workers)), timeout=10)


def _cells(source: str) -> list[str]:
    """Split the demo back into cells at top-level statements that start a new cell."""
    return [
        c
        for c in re.split(r"\n\n(?=(?:pipeline|child_pipeline|parent_pipeline|# Gen))", source)
        if c.strip()
    ]


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie (an orphan's reaper may be slow to collect it)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}


def test_readme_example_runs(tmp_path: Path) -> None:
    readme = (DEMO.parent.parent / "README.md").read_text()
    example = re.search(r"```python\n(import time\n.*?)```", readme, re.S)
    assert example is not None
    script = tmp_path / "example.py"
    script.write_text(example.group(1) + "print('PROFILE', sorted(latency))\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path, env=_env())  # fmt: skip
    assert result.returncode == 0, result.stderr
    shape_line, profile_line = result.stdout.strip().splitlines()
    assert shape_line.startswith("(480, 720, 3) ") and int(shape_line.split()[-1]) > 10
    assert profile_line == (
        "PROFILE ['MainPipeline', 'MainPipeline__Count', 'MainPipeline__Stage_1']"
    )


def test_workers_run_this_package_whatever_the_working_directory_holds(tmp_path: Path) -> None:
    """A worker starts with the working directory first on its path; a folder named
    pystream_zmq there (another checkout, say) must not be what it runs."""
    decoy = tmp_path / "cwd" / "pystream_zmq"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the decoy was imported')\n")
    script = tmp_path / "script.py"
    script.write_text(
        "from pystream_zmq import Pipeline\n"
        "def double(x): return 2 * x\n"
        "with Pipeline() as p:\n"
        "    p.add(double)\n"
        "    p.parallelize(block_output=True)\n"
        "    p.forward(21)\n"
        "    print(p.get_results())\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120, cwd=decoy.parent, env=_env())  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "42"


def test_workers_exit_when_the_orchestrator_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "victim.py"
    script.write_text(
        "import sys\n"
        "from pystream_zmq import Pipeline\n"
        "def same(data): return data\n"
        "pipeline = Pipeline()\n"
        "pipeline.add(same)\n"
        "pipeline.add(same)\n"
        "pipeline.parallelize()\n"
        "print('READY', flush=True)\n"
        "sys.stdin.read()\n"
    )
    victim = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env())  # fmt: skip
    try:
        assert victim.stdout is not None and victim.stdout.readline() == "READY\n"
        workers = psutil.Process(victim.pid).children()
        assert len(workers) == 2
        victim.kill()
        victim.wait(timeout=10)
        assert wait_until(lambda: not any(map(alive, workers)), timeout=5)
    finally:
        victim.kill()
        victim.communicate(timeout=10)
