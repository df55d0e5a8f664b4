"""Only a pipeline's own processes are believed: control replies are matched to their
requests, a peer's claimed identity buys it nothing, tcp control is under CURVE, the ledger
refuses sequence numbers never sent, and a forked child leaves the pipeline alone. Real
processes and sockets; a rogue is a socket the test connects itself."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import stages
import zmq
from click.testing import CliRunner
from conftest import wait_until
from test_seed_notebook import _env
from test_worker_cli import (
    BIN,
    REPO,
    Honcho,
    free_port_range,
    received,
    stopped_after,
    stopped_codes,
)
from zmq.utils.monitor import recv_monitor_message

from pystream_zmq import Pipeline
from pystream_zmq.cli import main as cli
from pystream_zmq.errors import WorkerCrashedError
from pystream_zmq.wire import codec, transport

TCP = "tcp://127.0.0.1"
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


def connect(sock: zmq.Socket[Any], endpoint: str, timeout: float = 10.0) -> bool:
    """Connect ``sock``; whether its first ZMTP handshake succeeded (False: the peer
    refused it)."""
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED)
    sock.connect(endpoint)
    try:
        assert monitor.poll(int(timeout * 1000)), "no handshake at all"
        return bool(recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)


# -- 4b: every control reply is matched to its request --------------------------------------
def test_a_late_control_reply_is_never_taken_for_the_answer_to_the_next_command(
    tmp_path: Path,
) -> None:
    """stats() gives up on a worker busy with a 2.5 s item; its counters come later, and
    the state collection after the drain must not take them for the state."""
    started = tmp_path / "started"
    slow = stages.SlowCount(2.5, str(started))
    with Pipeline() as pipeline:
        pipeline.add(slow, "Slow")
        pipeline.parallelize()
        assert pipeline.forward({"x": 1})
        assert wait_until(started.exists)
        assert "MainPipeline__Slow" not in pipeline.stats().stages  # it could not answer
        pipeline.stop_loop()  # drains (the late reply comes now), then asks for the state
        assert slow.n == 1
        assert pipeline.stats().stages["MainPipeline__Slow"]["processed"] == 1


# -- 9: only its own workers can talk to a pipeline ------------------------------------------
class Rogue(threading.Thread):
    """A DEALER that claims worker 0's routing id (b"0"), says READY, and answers any
    command with a state that would set ``Counter.count = 31337``."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        super().__init__(daemon=True)
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, b"0")
        self.connected = connect(self.sock, endpoint)
        self.received: list[list[bytes]] = []
        self.done = threading.Event()

    def run(self) -> None:
        if not self.connected:
            # Refused: nothing to say. (A blocking send on a DEALER whose handshakes keep
            # failing aborted libzmq 4.3.5 once, on Python 3.10 in CI.)
            return
        self.sock.send_multipart([transport.READY, bytes(16)])  # a token it never had
        while not self.done.is_set():
            if not self.sock.poll(20):
                continue
            message = self.sock.recv_multipart()
            self.received.append(message)
            echo = message[1:2]  # the request id, when there is one
            state = codec.encode({"MainPipeline__Count": {"count": 31337}})
            self.sock.send_multipart([transport.STATE, *echo, bytes(8), *state])

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)
        self.sock.close(linger=0)


@pytest.mark.parametrize("endpoint", [None, TCP], ids=["ipc", "tcp"])
def test_a_rogue_with_a_workers_identity_neither_hears_commands_nor_changes_stages(
    ctx: zmq.Context[Any], endpoint: str | None
) -> None:
    counter = stages.Counter("Count")
    with Pipeline() as pipeline:
        pipeline.add(counter)
        pipeline.parallelize(endpoint=endpoint, block_output=True)
        rogue = Rogue(ctx, pipeline.stats().endpoints["control"])
        rogue.start()
        try:
            if endpoint == TCP:  # plain loopback tcp: anyone on the machine could connect
                assert not rogue.connected  # refused by CURVE
            else:  # the folder is 0700: only this user; still, its id buys it nothing
                assert rogue.connected
                assert wait_until(lambda: pipeline.stats().rogue_control >= 1)
            for x in range(5):
                assert pipeline.forward({"x": x})
            assert pipeline.get_results() is not None
            pipeline.stop_loop()
            assert counter.count == 5
            assert pipeline.stats().stages["MainPipeline__Count"]["processed"] == 5
        finally:
            rogue.stop()
        assert rogue.received == []


# -- 8: the ledger refuses the impossible ----------------------------------------------------
@pytest.mark.parametrize("endpoint", [None, TCP], ids=["ipc", "tcp"])
def test_an_item_with_a_sequence_number_never_sent_is_rogue_not_lost(
    ctx: zmq.Context[Any], endpoint: str | None
) -> None:
    """Injected at the sink (plain loopback tcp without curve, or ipc as the same user)."""
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one)
        pipeline.parallelize(endpoint=endpoint)
        for x in range(3):
            assert pipeline.forward({"x": x})
        pipeline.stop_loop()
        assert pipeline.get_results() == {"x": 3}
        rogue = ctx.socket(zmq.PUSH)
        rogue.setsockopt(zmq.LINGER, 0)
        # The data links stay as the user chose: plaintext.
        assert connect(rogue, pipeline.stats().endpoints["sink-0"])
        rogue.send_multipart(
            transport.pack_message(
                transport.KIND_DATA, 10**9, time.time(), codec.encode({"x": 666})
            )
        )
        assert wait_until(lambda: pipeline.stats().rogue == 1)
        rogue.close(linger=0)
        assert pipeline.get_results() is None  # not handed on as an output
        for x in range(3, 5):
            assert pipeline.forward({"x": x})
        pipeline.stop_loop()
        assert pipeline.get_results() == {"x": 5}
        book = pipeline.stats()
        assert (book.forwarded, book.delivered, book.lost, book.rogue) == (5, 5, 0, 1)
        assert book.out == 5


def test_past_the_last_restart_every_item_in_flight_is_counted_lost() -> None:
    with Pipeline() as pipeline:
        pipeline.add(stages.Sleep(0.2), "Slow")
        pipeline.add(stages.add_one)
        pipeline.parallelize(max_restarts=0, input_timeout=5)

        def send() -> None:
            with contextlib.suppress(WorkerCrashedError):  # when the kill comes first
                for x in range(32):
                    pipeline.forward({"x": x})

        sender = threading.Thread(target=send)
        sender.start()
        try:
            assert wait_until(lambda: pipeline.stats().delivered >= 3)
            os.kill(pipeline.stats().workers[0].pid, signal.SIGKILL)

            def accounted() -> bool:
                book = pipeline.stats()
                return book.delivered + book.dropped + book.lost == book.forwarded

            assert wait_until(accounted, timeout=10), pipeline.stats()
        finally:
            sender.join(timeout=30)
        book = pipeline.stats()
        assert book.lost > 0 and book.delivered < book.forwarded <= 32
        assert sum(last - first + 1 for first, last in book.lost_ranges) == book.lost
        with pytest.raises(WorkerCrashedError, match="Slow"):
            pipeline.forward({"x": 32})


# -- 6: fork-safe ------------------------------------------------------------------------------
FORKING = """
import json, os, signal, sys, time
from pystream_zmq import Pipeline
from stages import add_one

def wait_until(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True

pipeline = Pipeline()
pipeline.add(add_one, "One")
pipeline.add(add_one, "Two")
pipeline.parallelize(block_output=True, output_timeout=10)
result = {"before": pipeline.forward({"x": 0}) and pipeline.get_results()}
child = os.fork()
if child == 0:
    sys.exit(0)  # a normal exit: the exit hooks and finalizers this process inherited run
os.waitpid(child, 0)
result["socket_dir_kept"] = os.path.isdir(pipeline.stats().socket_dir)
os.kill(pipeline.stats().workers[0].pid, signal.SIGKILL)
result["restarted"] = wait_until(lambda: pipeline.stats().workers[0].restarts == 1)
pipeline.forward({"x": 10})
result["after"] = pipeline.get_results()
# A forked child that lives on while the pipeline stops.
read, write = os.pipe()
child = os.fork()
if child == 0:
    os.close(write)
    os.read(read, 1)
    os._exit(0)
os.close(read)
pipeline.cleanup()
os.close(write)
os.waitpid(child, 0)
print(json.dumps(result))
"""


def test_a_forked_child_leaves_the_pipeline_alone(tmp_path: Path) -> None:
    """A child that exits normally removes nothing (a killed worker still restarts and
    items flow); one that lives on holds no worker's stdin (they stop without a signal)."""
    script = tmp_path / "forking.py"
    script.write_text(FORKING)
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {
        "before": {"x": 2}, "socket_dir_kept": True, "restarted": True, "after": {"x": 12}
    }  # fmt: skip
    assert "did not exit in time" not in done.stderr  # nobody had to be terminated


# -- 9: a Procfile under CURVE -----------------------------------------------------------------
def curve_pipeline() -> Pipeline:
    pipeline = Pipeline(input_generator=stages.counting, use_profiler=True)
    pipeline.add(stages.add_one, "One")
    pipeline.add(stages.add_one, "Two")
    return pipeline


def test_procfile_curve_writes_keys_and_its_processes_refuse_a_plaintext_peer(
    tmp_path: Path, ctx: zmq.Context[Any]
) -> None:
    base = free_port_range(4)
    keys, procfile = tmp_path / "keys", tmp_path / "Procfile"
    args = ["procfile", "test_trust:curve_pipeline", "--period", "0.002"]
    args += ["--base-port", str(base), "--curve", str(keys), "-o", str(procfile)]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    entries = ["source", "One", "Two", "sink"]
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert stat.S_IMODE((keys / "allowed").stat().st_mode) == 0o700
    for entry in entries:
        assert stat.S_IMODE((keys / f"{entry}.key_secret").stat().st_mode) == 0o600
    assert sorted(p.name for p in (keys / "allowed").iterdir()) == sorted(
        f"{entry}.key" for entry in entries
    )
    lines = dict(line.split(": ", 1) for line in procfile.read_text().splitlines()[1:])
    assert f"--curve-profile-key {keys}/sink.key" in lines["One"]
    assert f"--curve-server-key {keys}/Two.key" in lines["One"]

    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    env["PYSTREAM_PROFILE_DIR"] = str(tmp_path / "profiles")
    env.pop("PORT", None)
    honcho = Honcho(procfile, tmp_path, env)
    try:
        assert wait_until(lambda: received(honcho) > 50, timeout=60, interval=0.1), honcho.output()
        for port in range(base, base + 4):  # the sink's profile port, then every input
            rogue = ctx.socket(zmq.PUSH)
            rogue.setsockopt(zmq.LINGER, 0)
            assert not connect(rogue, f"{TCP}:{port}"), port
            rogue.close(linger=0)
        assert honcho.stop() == 128 + signal.SIGTERM
        output = honcho.output()
        assert stopped_codes(output) == dict.fromkeys(entries, 0), output
        sent, got = stopped_after(output, "source"), stopped_after(output, "sink")
        assert sent and got and int(got.group(1)) == int(sent.group(1)) > 50, output
    finally:
        honcho.kill_all()
