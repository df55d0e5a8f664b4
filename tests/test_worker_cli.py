"""``pystream-worker`` and ``pystream procfile``: argument errors in-process (CliRunner), and
real processes under honcho, stopped with SIGTERM."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
import stages
from click.testing import CliRunner
from conftest import wait_until

from pystream_zmq import Pipeline
from pystream_zmq.cli import main as cli
from pystream_zmq.cli import worker as worker_cli
from pystream_zmq.profiling.store import DB_FILENAME
from pystream_zmq.profiling.summary import read_profiles
from services import demo, vision

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENDPOINTS = ["--pull", "tcp://127.0.0.1:5999", "--push", "tcp://127.0.0.1:5998"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_range(count: int) -> int:
    """The first of ``count`` consecutive free ports."""
    while True:
        base = free_port()
        if base + count > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return base


# -- bad command lines: one line, a named exit code ------------------------------------------
@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["stage", "no_such_module:f", *ENDPOINTS], worker_cli.EXIT_IMPORT,
         "cannot import module 'no_such_module'"),
        (["stage", "services.demo:no_such", *ENDPOINTS], worker_cli.EXIT_IMPORT,
         "has no attribute 'no_such'"),
        (["stage", "services.demo", *ENDPOINTS], worker_cli.EXIT_IMPORT, "is not MODULE:ATTR"),
        (["stage", "pystream_zmq.wire.transport:KIND_EOS", *ENDPOINTS], worker_cli.EXIT_IMPORT,
         "int is not callable"),
        (["stage", "services.demo:DummyStage", *ENDPOINTS], worker_cli.EXIT_IMPORT,
         "missing 1 required positional argument: 'name'"),
        (["stage", "services.demo:dummy_stage_func", "--param", "k=1", *ENDPOINTS],
         worker_cli.EXIT_IMPORT, "takes no params"),
        (["pipeline", "services.demo:generate_data", *ENDPOINTS], worker_cli.EXIT_IMPORT,
         "not a Pipeline"),
        (["stage", "services.demo:blur", "--pull", "tcp:/127.0.0.1:5", "--push", "ipc:///x"],
         worker_cli.EXIT_USAGE, "'tcp:/127.0.0.1:5' is not tcp://HOST:PORT or ipc://PATH"),
        (["stage", "services.demo:blur", "--pull", "tcp://127.0.0.1:70000", "--push", "ipc:///x"],
         worker_cli.EXIT_USAGE, "is not tcp://HOST:PORT"),
        (["stage", "services.demo:dummy_stage_func", "--push", "ipc:///x"],
         worker_cli.EXIT_USAGE, "give --pull (or set PORT)"),
        (["stage", "services.demo:DummyStage", "--param", "name=a-b", *ENDPOINTS],
         worker_cli.EXIT_USAGE, "invalid stage name 'a-b'"),
        (["stage", "services.demo:DummyStage", "--params", "[1]", *ENDPOINTS],
         worker_cli.EXIT_USAGE, "--params must be a JSON object"),
        (["sink", "--pull", "tcp://127.0.0.1:5999", "--bogus"], worker_cli.EXIT_USAGE,
         "No such option '--bogus'"),
        (["source", "services.demo:generate_data"], worker_cli.EXIT_USAGE,
         "Missing option '--push'"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_a_named_exit_code(
    args: list[str], code: int, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PORT", raising=False)
    result = CliRunner().invoke(worker_cli.main, args)
    assert result.exit_code == code, result.output
    assert message in result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pystream-worker: error: "), lines


def test_verbose_adds_the_traceback() -> None:
    result = CliRunner().invoke(worker_cli.main, ["-v", "stage", "no_such_module:f", *ENDPOINTS])
    assert result.exit_code == worker_cli.EXIT_IMPORT
    assert "Traceback (most recent call last)" in result.output
    assert "ModuleNotFoundError" in result.output


def test_options_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYSTREAM_PULL", "tcp:/bad")
    result = CliRunner().invoke(
        worker_cli.main, ["stage", "services.demo:blur", "--push", "ipc:///x"]
    )
    assert result.exit_code == worker_cli.EXIT_USAGE
    assert "PYSTREAM_PULL" in result.output and "'tcp:/bad'" in result.output


def test_a_port_in_use_is_one_line() -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = subprocess.run(
            [BIN / "pystream-worker", "stage", "services.vision:blur",
             "--pull", f"tcp://127.0.0.1:{port}", "--push", "tcp://127.0.0.1:5998"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == worker_cli.EXIT_ADDRESS, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"pystream-worker: error: Address already in use (addr='tcp://127.0.0.1:{port}')"
    )
    assert "Traceback" not in result.stderr


# -- Procfile generation -----------------------------------------------------------------------
def test_the_shipped_procfile_is_generated_from_the_video_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the job makes its demo video in the working folder
    shipped = (REPO / "Procfile").read_text()
    header = shipped.splitlines()[0]
    assert header.startswith("# Generated by: pystream procfile services.video:video_job ")
    command = shlex.split(header.removeprefix("# Generated by: "))
    result = CliRunner().invoke(cli.main, command[1:])
    assert result.exit_code == 0, result.output
    assert result.output == shipped
    processes = [line.split(":")[0] for line in shipped.splitlines()[1:]]
    assert processes == ["source", "Blur", "Detect", "sink"]


def test_procfile_names_what_cannot_be_imported() -> None:
    result = CliRunner().invoke(cli.main, ["procfile", "tests_no_such:f"])
    assert result.exit_code == 1
    assert result.output == (
        "Error: tests_no_such:f: cannot import module 'tests_no_such': "
        "No module named 'tests_no_such'\n"
    )


def child_pipeline_definition() -> Pipeline:
    child = Pipeline()
    child.add(vision.blur, "Blur")
    parent = Pipeline(input_generator=demo.generate_data)
    parent.add(child.as_stage(), "Child")
    return parent


def replicated_pipeline_definition() -> Pipeline:
    pipeline = Pipeline(input_generator=stages.counting)
    pipeline.add(stages.jitter, "Jitter", replicas=2)
    pipeline.add(stages.add_one, "After")
    return pipeline


def local_pipeline_definition() -> Pipeline:
    pipeline = Pipeline(input_generator=lambda: {"x": 1})
    pipeline.add(vision.blur)
    return pipeline


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        ("child_pipeline_definition", "Child is a sub-pipeline"),
        ("local_pipeline_definition", "cannot be imported by name"),
    ],
)
def test_procfile_refuses_what_it_cannot_write(definition: str, message: str) -> None:
    result = CliRunner().invoke(cli.main, ["procfile", f"test_worker_cli:{definition}"])
    assert result.exit_code == 1
    assert message in result.output


def test_procfile_rebuilds_stages_from_their_attributes() -> None:
    result = CliRunner().invoke(
        cli.main, ["procfile", "services.vision:vision_pipeline", "--base-port", "6000"]
    )
    assert result.exit_code == 0, result.output
    lines = dict(line.split(": ", 1) for line in result.output.splitlines()[1:])
    assert lines["source"] == (
        "exec pystream-worker source services.vision:MovingScene --period 0.01 "
        "--push tcp://127.0.0.1:6001"
    )
    assert lines["Blur"].startswith("exec pystream-worker stage services.vision:blur --name Blur")
    assert "--stages Resize,Blur,Edges,Overlay" in lines["sink"]


# -- real processes ------------------------------------------------------------------------------
class Honcho:
    """honcho running a Procfile, its output in a file; kills everything it started if the
    test did not stop it cleanly."""

    def __init__(self, procfile: Path, workdir: Path, env: dict[str, str]) -> None:
        self.log = workdir / "honcho.log"
        self.out_file = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "honcho", "-f", str(procfile), "-d", str(workdir), "start"],
            stdout=self.out_file, stderr=subprocess.STDOUT, env=env, cwd=workdir,
            start_new_session=True,
        )  # fmt: skip
        self.seen: dict[int, psutil.Process] = {}  # every descendant, while it was alive
        self.commands: dict[int, list[str]] = {}

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def remember_processes(self) -> None:
        try:
            for proc in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(proc.pid, proc)
                with contextlib.suppress(psutil.Error):
                    # the latest: honcho's `sh -c exec ...` becomes the worker it execs
                    self.commands[proc.pid] = proc.cmdline()
        except psutil.NoSuchProcess:
            pass

    def stop(self) -> int:
        self.remember_processes()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)

    def kill_all(self) -> None:
        if self.proc.poll() is None:
            self.remember_processes()
        for pid in [self.proc.pid, *self.seen]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # honcho starts each in its own group
        self.proc.wait(timeout=10)
        self.out_file.close()


@pytest.fixture
def honcho_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    env["PYSTREAM_PROFILE_DIR"] = str(tmp_path / "profiles")
    env.pop("PORT", None)
    return env


@pytest.fixture
def run_honcho(tmp_path: Path, honcho_env: dict[str, str]) -> Iterator[Callable[[Path], Honcho]]:
    started: list[Honcho] = []

    def start(procfile: Path) -> Honcho:
        honcho = Honcho(procfile, tmp_path, honcho_env)
        started.append(honcho)
        return honcho

    yield start
    for honcho in started:
        honcho.kill_all()


def stopped_codes(output: str) -> dict[str, int]:
    return {name: int(rc) for name, rc in re.findall(r"(\S+)\.1 stopped \(rc=(-?\d+)\)", output)}


def received(honcho: Honcho) -> int:
    """The sink's latest progress line: items received so far."""
    counts = re.findall(r"sink\.1 .* (\d+) items received", honcho.output())
    return int(counts[-1]) if counts else 0


def stopped_after(output: str, process: str) -> re.Match[str] | None:
    """The process's last log line: "stopped after N items"."""
    return re.search(rf"{process}\.1 .* stopped after (\d+) items", output)


def live_frame(address: str) -> np.ndarray | None:
    """The frame a live view at ``address`` shows now; None before it serves one."""
    try:
        with urllib.request.urlopen(f"http://{address}/frame.jpg", timeout=5) as response:
            return cv2.imdecode(np.frombuffer(response.read(), np.uint8), cv2.IMREAD_COLOR)
    except OSError:  # not serving yet, or no frame yet (404)
        return None


def event_counts(db: Path) -> dict[str, int]:
    if not db.exists():
        return {}
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return dict(conn.execute("SELECT path, count(*) FROM events GROUP BY path").fetchall())


def test_honcho_runs_the_shipped_procfile_which_ends_by_itself(
    run_honcho: Callable[[Path], Honcho], tmp_path: Path
) -> None:
    """The video job: the demo video is made, every frame goes through with its boxes, the
    latest image is no black square, and at the end of the video every process exits 0."""
    honcho = run_honcho(REPO / "Procfile")
    latest = tmp_path / "latest.png"
    db = tmp_path / "profiles" / DB_FILENAME
    paths = {"MainPipeline", "MainPipeline__Blur", "MainPipeline__Detect"}

    def flowing() -> bool:
        honcho.remember_processes()
        return latest.exists() and set(event_counts(db)) == paths

    assert wait_until(flowing, timeout=60, interval=0.2), honcho.output()
    image = cv2.imread(str(latest))
    assert image is not None and image.shape == (480, 640, 3)
    assert image.mean() > 30  # the scene, not a black square
    shown = live_frame("127.0.0.1:5790")  # the sink's --live-view, while the video plays
    assert shown is not None and shown.shape == (480, 640, 3) and shown.mean() > 30
    assert honcho.proc.wait(timeout=60) == 0, honcho.output()  # 300 frames at 30/s: 10 s
    output = honcho.output()
    assert stopped_codes(output) == dict.fromkeys(["source", "Blur", "Detect", "sink"], 0), output
    sink = stopped_after(output, "sink")
    assert sink is not None and int(sink.group(1)) == 300, output
    assert "WARNING" not in output and "SIGKILL" not in output, output
    latency, _ = read_profiles(db, 1)
    assert set(latency) == paths and all(value > 0 for value in latency.values())
    workers = [cmd for cmd in honcho.commands.values() if "sh" not in Path(cmd[0]).name]
    assert sum("pystream-worker" in " ".join(cmd) for cmd in workers) == 4, honcho.commands
    assert not [proc for proc in honcho.seen.values() if proc.is_running()]


def test_sigterm_drains_every_item_in_flight(
    run_honcho: Callable[[Path], Honcho], tmp_path: Path
) -> None:
    """Fast stages: everything the source sent before SIGTERM reaches the sink."""
    ports = [free_port() for _ in range(3)]
    worker = "exec pystream-worker"
    procfile = tmp_path / "Procfile"
    procfile.write_text(
        f"source: {worker} source stages:tiny --period 0.001 --push tcp://127.0.0.1:{ports[0]}\n"
        f"one: {worker} stage stages:add_one --pull tcp://127.0.0.1:{ports[0]}"
        f" --push tcp://127.0.0.1:{ports[1]}\n"
        f"two: {worker} stage stages:add_one --name Two --pull tcp://127.0.0.1:{ports[1]}"
        f" --push tcp://127.0.0.1:{ports[2]}\n"
        f"sink: {worker} sink --pull tcp://127.0.0.1:{ports[2]} --report-every 0.1\n"
    )
    honcho = run_honcho(procfile)

    assert wait_until(lambda: received(honcho) > 100, timeout=60, interval=0.1), honcho.output()
    assert honcho.stop() == 128 + signal.SIGTERM
    output = honcho.output()
    assert stopped_codes(output) == {"source": 0, "one": 0, "two": 0, "sink": 0}, output
    sent, got = stopped_after(output, "source"), stopped_after(output, "sink")
    assert sent and got, output
    assert int(got.group(1)) == int(sent.group(1)) > 100
    assert not [proc for proc in honcho.seen.values() if proc.is_running()]


def test_vision_pipeline_as_one_process_and_a_restarted_stage_rejoins(
    honcho_env: dict[str, str], tmp_path: Path
) -> None:
    """`pipeline` runs the vision stages inline; killing and restarting it does not need a
    restart of the source or the sink (they reconnect)."""
    ports = [free_port() for _ in range(2)]
    latest = tmp_path / "out.png"
    commands = {
        "sink": ["sink", "--pull", f"tcp://127.0.0.1:{ports[1]}", "--report-every", "0.1",
                 "--save-latest", str(latest)],
        "pipeline": ["pipeline", "services.vision:vision_pipeline", "--name", "Vision",
                     "--pull", f"tcp://127.0.0.1:{ports[0]}", "--push",
                     f"tcp://127.0.0.1:{ports[1]}"],
        "source": ["source", "services.vision:MovingScene", "--period", "0.01",
                   "--push", f"tcp://127.0.0.1:{ports[0]}"],
    }  # fmt: skip
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str) -> None:
        with (tmp_path / f"{name}.log").open("ab") as log:  # the child keeps its own copy
            procs[name] = subprocess.Popen(
                [BIN / "pystream-worker", *commands[name]], stdout=log, stderr=log, env=honcho_env
            )

    def sink_count() -> int:
        counts = re.findall(r"(\d+) items received", (tmp_path / "sink.log").read_text())
        return int(counts[-1]) if counts else 0

    try:
        for name in commands:  # downstream first: any order works
            start(name)
        assert wait_until(lambda: sink_count() > 20, timeout=60), sink_count()
        procs["pipeline"].send_signal(signal.SIGTERM)
        assert procs["pipeline"].wait(timeout=10) == 0
        before = sink_count()
        start("pipeline")
        assert wait_until(lambda: sink_count() > before + 20, timeout=60)
        image = cv2.imread(str(latest))
        assert image is not None and image.shape == (240, 320, 3)
        green = (image[:, :, 1] > 200) & (image[:, :, 0] < 50) & (image[:, :, 2] < 50)
        assert green.sum() > 50  # the overlay drew the edges
        for name in ("source", "pipeline", "sink"):
            procs[name].send_signal(signal.SIGTERM)
        assert {name: proc.wait(timeout=10) for name, proc in procs.items()} == dict.fromkeys(
            commands, 0
        )
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_services_run_under_the_python_api_too() -> None:
    with vision.vision_pipeline() as pipeline:
        pipeline.parallelize(block_output=True)
        assert pipeline.forward()
        out = pipeline.get_results()
    assert out["frame"].shape == (240, 320, 3) and out["edges"].shape == (240, 320)
    assert np.any(out["edges"])


def test_port_from_honcho_and_a_second_signal_exits_at_once(
    honcho_env: dict[str, str], tmp_path: Path
) -> None:
    """A sink without --pull binds honcho's PORT. With nothing upstream, its drain would wait
    for an end of stream; a second SIGTERM ends the wait at once."""
    port = free_port()
    log = tmp_path / "sink.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [BIN / "pystream-worker", "sink", "--drain-timeout", "30"],
            stdout=out, stderr=out, env={**honcho_env, "PORT": str(port)},
        )  # fmt: skip
    try:
        assert wait_until(lambda: "ready" in log.read_text(), timeout=30), log.read_text()
        assert f"ready: input tcp://127.0.0.1:{port}," in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: "waiting for the items in flight" in log.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 128 + signal.SIGTERM
        assert "second signal (SIGTERM): exiting at once" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_honcho_runs_a_generated_procfile_with_replicas_in_order(
    run_honcho: Callable[[Path], Honcho], tmp_path: Path
) -> None:
    """A replicated stage is one entry per replica; the stage after it binds an input per
    replica and merges them in order; a stop drains through both replicas."""
    base = free_port_range(8)
    procfile = tmp_path / "Procfile"
    args = ["procfile", "test_worker_cli:replicated_pipeline_definition", "--period", "0.002"]
    result = CliRunner().invoke(cli.main, [*args, "--base-port", str(base), "-o", str(procfile)])
    assert result.exit_code == 0, result.output
    entries = [line.split(":")[0] for line in procfile.read_text().splitlines()[1:]]
    assert entries == ["source", "Jitter_0", "Jitter_1", "After", "sink"]
    honcho = run_honcho(procfile)

    assert wait_until(lambda: received(honcho) > 100, timeout=60, interval=0.1), honcho.output()
    assert honcho.stop() == 128 + signal.SIGTERM
    output = honcho.output()
    assert stopped_codes(output) == dict.fromkeys(entries, 0), output
    sent, got = stopped_after(output, "source"), stopped_after(output, "sink")
    shares = [stopped_after(output, name) for name in entries[1:3]]
    assert sent and got and all(shares), output
    assert int(got.group(1)) == int(sent.group(1)) > 100  # drained, each once, in order:
    assert "out of order" not in output  # the sink counts nothing that came out of order
    assert all(int(share.group(1)) > 0 for share in shares if share)
    assert sum(int(share.group(1)) for share in shares if share) == int(sent.group(1))
    assert not [proc for proc in honcho.seen.values() if proc.is_running()]


def test_honcho_runs_a_generated_procfile_whose_sink_serves_the_live_view(
    run_honcho: Callable[[Path], Honcho], tmp_path: Path
) -> None:
    """`pystream procfile --live-view`: the sink serves the pipeline's latest frame."""
    base, view = free_port_range(6), free_port()
    procfile = tmp_path / "Procfile"
    args = ["procfile", "services.vision:vision_pipeline", "--base-port", str(base)]
    args += ["--live-view", f"127.0.0.1:{view}", "-o", str(procfile)]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    honcho = run_honcho(procfile)

    address = f"127.0.0.1:{view}"
    assert wait_until(lambda: live_frame(address) is not None, timeout=60, interval=0.1), (
        honcho.output()
    )
    image = live_frame(address)
    assert image is not None and image.shape == (240, 320, 3)
    assert image.max() > 200  # the overlay's green edges: not a black frame
    assert honcho.stop() == 128 + signal.SIGTERM
    assert stopped_codes(honcho.output())["sink"] == 0, honcho.output()
    assert not [proc for proc in honcho.seen.values() if proc.is_running()]


def test_procfile_refuses_a_live_view_the_network_could_reach() -> None:
    args = ["procfile", "services.vision:vision_pipeline", "--live-view", "0.0.0.0:8000"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code != 0
    assert "--live-view 0.0.0.0:8000: not a loopback address" in result.output


def test_modules_are_imported_from_the_working_directory(tmp_path: Path) -> None:
    """As `python -m` does: `pystream procfile mystages:build` and `pystream-worker stage
    mystages:double` find mystages.py in the folder they are started from."""
    (tmp_path / "mystages.py").write_text(
        "from pystream_zmq import Pipeline\n"
        "def double(data): return data\n"
        "def source(): return {'x': 1}\n"
        "def build():\n"
        "    pipeline = Pipeline(input_generator=source)\n"
        "    pipeline.add(double)\n"
        "    return pipeline\n"
    )
    env = dict(os.environ)
    made = subprocess.run(
        [str(BIN / "pystream"), "procfile", "mystages:build"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "pystream-worker stage mystages:double" in made.stdout
    port = free_port()
    worker = subprocess.Popen(
        [str(BIN / "pystream-worker"), "stage", "mystages:double", "--pull",
         f"tcp://127.0.0.1:{port}", "--push", f"tcp://127.0.0.1:{free_port()}"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert worker.stderr is not None
        assert "ready: input" in worker.stderr.readline()
    finally:
        worker.terminate()
        worker.communicate(timeout=10)


def test_help_shows_defaults_and_an_example_for_each_role() -> None:
    for role in ("stage", "pipeline", "source", "sink"):
        out = CliRunner().invoke(worker_cli.main, [role, "--help"])
        assert out.exit_code == 0, out.output
        assert "default:" in out.output and f"Example: pystream-worker {role} " in out.output
