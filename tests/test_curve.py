"""tcp across hosts and CURVE: real worker processes and sockets.

The "hosts" are loopback addresses (127.0.0.2 for one, 127.0.0.3 for another): they need no
privilege. Where this user may create network namespaces (root with CAP_NET_ADMIN), one
more test puts a worker in its own namespace, joined to this one by a veth pair, so it binds
an address that is not loopback, as on a real second host.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import stages
import zmq
import zmq.auth
from click.testing import CliRunner
from conftest import wait_until
from zmq.utils.monitor import recv_monitor_message

from pystream_zmq import Pipeline, SecurityError
from pystream_zmq.cli import main as cli
from pystream_zmq.cli import worker as worker_cli
from pystream_zmq.profiling.events import unpack_events
from pystream_zmq.profiling.store import DB_FILENAME
from pystream_zmq.wire import codec, security, transport

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST_A, HOST_B = "127.0.0.2", "127.0.0.3"
NOT_HERE = "198.51.100.1"  # TEST-NET-2 (RFC 5737): on no machine's interfaces

Spawn = Callable[..., tuple[subprocess.Popen[bytes], Path]]


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    security.generate(folder, ["source", "stage", "sink", "stranger"])
    return folder


def allow(keys: Path, folder: Path, *names: str) -> Path:
    """An allow-list directory holding the public keys of ``names``."""
    folder.mkdir(mode=0o700)
    for name in names:
        shutil.copy(keys / f"{name}.key", folder)
    return folder


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start ``pystream-worker`` (after ``prefix``, e.g. ``ip netns exec NS``), output to a
    log file; whatever the test did not stop is killed at the end."""
    started: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}

    def start(
        name: str, args: list[Any], prefix: tuple[str, ...] = ()
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out:  # the child keeps its own copy
            command = [*prefix, str(BIN / "pystream-worker"), *map(str, args)]
            started.append(subprocess.Popen(command, stdout=out, stderr=out, env=env))
        return started[-1], log

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def item(seq: int, x: int) -> list[Any]:
    return transport.pack_message(transport.KIND_DATA, seq, time.time(), codec.encode({"x": x}))


def receive(sock: zmq.Socket[Any], timeout: float = 15.0) -> tuple[int, int, Any]:
    """(kind, seq, data) of the next message, which must come within ``timeout``."""
    assert sock.poll(int(timeout * 1000)), "nothing arrived in time"
    frames = sock.recv_multipart()
    kind, seq, _ = transport.unpack_envelope(frames[0])
    return (
        kind,
        seq,
        codec.decode(transport.payload(frames)) if kind == transport.KIND_DATA else None,
    )


def client(
    ctx: zmq.Context[Any],
    endpoint: str,
    own: Path | None = None,
    server: Path | None = None,
    kind: int = zmq.PUSH,
) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    """A socket connected to ``endpoint``, CURVE with key pair ``own`` and server key
    ``server`` (plaintext without them), and a monitor of its connection events."""
    curve = None
    if own is not None and server is not None:
        public, secret = security.load_key_pair(own)
        curve = security.Curve(public, secret, server_key=security.load_public_key(server))
    push = ctx.socket(kind)
    push.linger = 0
    monitor = push.get_monitor_socket()
    security.connect(push, endpoint, curve)
    return push, monitor


# A plaintext client learns it was refused either from the server's greeting (PROTOCOL) or,
# when the server hangs up first, only from the closed connection (NO_DETAIL): a race.
PLAINTEXT_REFUSED = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


def wait_event(monitor: zmq.Socket[Any], wanted: int, timeout: float = 15.0) -> None:
    """Wait for one of the events in the bit mask ``wanted``."""
    seen = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0 and monitor.poll(int(left * 1000) + 1):
        event = recv_monitor_message(monitor)["event"]
        if event & wanted:
            return
        seen.append(zmq.Event(event).name)
    raise AssertionError(f"no {zmq.Event(wanted)!r} within {timeout} s; saw {seen}")


@contextlib.contextmanager
def curve_context(curve: security.Curve | None) -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    auth = security.start_authenticator(ctx, curve)
    try:
        yield ctx
    finally:
        security.stop_authenticator(auth)
        ctx.destroy(linger=0)


# -- the allow-list --------------------------------------------------------------------------
def test_only_allowed_client_keys_get_items_through_a_worker(
    tmp_path: Path, keys: Path, spawn: Spawn
) -> None:
    """A stranger's key and a plaintext client each deliver 0 frames, while an allowed key,
    connected to the same worker after them, gets its items through (and so do the worker's
    profile events, over CURVE to the sink's key)."""
    pull = f"tcp://{HOST_A}:{free_port(HOST_A)}"
    push = f"tcp://{HOST_B}:{free_port(HOST_B)}"
    profile = f"tcp://{HOST_B}:{free_port(HOST_B)}"
    sink_keys = security.load_key_pair(keys / "sink.key_secret")
    sink_curve = security.Curve(*sink_keys, allow=str(allow(keys, tmp_path / "a", "stage")))
    with curve_context(sink_curve) as ctx:
        sink, events = ctx.socket(zmq.PULL), ctx.socket(zmq.PULL)
        security.bind(sink, push, sink_curve)
        security.bind(events, profile, sink_curve)
        worker, log = spawn("stage", [
            "stage", "stages:add_one", "--name", "Guarded", "--pull", pull, "--push", push,
            "--profile", profile, "--curve-secret", keys / "stage.key_secret",
            "--curve-allow", allow(keys, tmp_path / "b", "source"),
            "--curve-server-key", keys / "sink.key", "--curve-profile-key", keys / "sink.key",
        ])  # fmt: skip
        stranger, stranger_events = client(
            ctx, pull, keys / "stranger.key_secret", keys / "stage.key"
        )
        plain, plain_events = client(ctx, pull)
        for i in range(3):  # queued at once, for as soon as a connection is up
            stranger.send_multipart(item(100 + i, 1000 + i), zmq.NOBLOCK)
            plain.send_multipart(item(200 + i, 2000 + i), zmq.NOBLOCK)
        wait_event(stranger_events, zmq.EVENT_HANDSHAKE_FAILED_AUTH)  # the ZAP handler said no
        wait_event(plain_events, PLAINTEXT_REFUSED)  # no CURVE, no entry
        allowed = client(ctx, pull, keys / "source.key_secret", keys / "stage.key")[0]
        for i in range(3):
            allowed.send_multipart(item(i, 10 * i), zmq.NOBLOCK)
        allowed.send(transport.pack_envelope(transport.KIND_EOS, 7, time.time()))

        data = transport.KIND_DATA
        got = [receive(sink) for _ in range(4)]
        assert got == [(data, 0, {"x": 1}), (data, 1, {"x": 11}), (data, 2, {"x": 21}),
                       (transport.KIND_EOS, 7, None)]  # fmt: skip
        assert not sink.poll(500)  # the strangers' six items, sent first: none, by a deadline

        worker.send_signal(signal.SIGTERM)
        assert receive(sink)[0] == transport.KIND_EOS  # its own end of stream at the stop
        sink.close()  # the disconnect is what lets it exit
        assert worker.wait(timeout=10) == 0, log.read_text()
        assert "stopped after 3 items (0 stage errors)" in log.read_text()

        profiled: list[int] = []

        def all_profiled() -> bool:
            while events.poll(0):
                message = events.recv_multipart()
                if message[0] == transport.EVENTS:
                    profiled.extend(event[1] for event in unpack_events(message[1]))
            return sorted(profiled) == [0, 1, 2]

        assert wait_until(all_profiled), profiled


# -- binding an address other hosts can reach ------------------------------------------------
@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("tcp://127.0.0.1:5", True), ("tcp://127.3.4.5:5", True), ("tcp://[::1]:5", True),
        ("tcp://localhost:5", True), ("tcp://LocalHost:*", True), ("ipc:///tmp/x", True),
        ("tcp://*:5", False), ("tcp://0.0.0.0:5", False), ("tcp://[::]:5", False),
        ("tcp://10.0.0.1:5", False), ("tcp://[fd00::2]:5", False), ("tcp://eth0:5", False),
        ("tcp://lo:5", False), ("tcp://camera-host:5", False), ("pgm://eth0;239.1.1.1:5", False),
    ],
)  # fmt: skip
def test_what_counts_as_loopback(endpoint: str, expected: bool) -> None:
    assert security.is_loopback(endpoint) is expected


@pytest.mark.parametrize(
    ("args", "address"),
    [
        (["stage", "stages:add_one", "--pull", "tcp://*:5999", "--push", "tcp://127.0.0.1:5998"],
         "tcp://*:5999"),
        (["pipeline", "services.demo:seed_pipeline", "--pull", f"tcp://{NOT_HERE}:5999", "--push",
          "tcp://127.0.0.1:5998"], f"tcp://{NOT_HERE}:5999"),
        (["sink", "--pull", "tcp://127.0.0.1:5999", "--profile-pull", "tcp://0.0.0.0:5997"],
         "tcp://0.0.0.0:5997"),
        (["sink", "--pull", "tcp://[::]:5999"], "tcp://[::]:5999"),
    ],
)  # fmt: skip
def test_a_non_loopback_bind_is_refused_without_curve_or_insecure(
    args: list[str], address: str
) -> None:
    result = CliRunner().invoke(worker_cli.main, args)
    assert result.exit_code == worker_cli.EXIT_USAGE, result.output
    assert result.output.startswith(
        f"pystream-worker: error: refusing to bind {address}: it is not a loopback address"
    )
    assert "--curve-secret and --curve-allow" in result.output and "--insecure" in result.output
    assert len(result.output.splitlines()) == 1


@pytest.mark.parametrize("secured", ["insecure", "curve"])
def test_insecure_or_curve_let_a_non_loopback_address_be_bound(
    secured: str, tmp_path: Path, keys: Path, spawn: Spawn
) -> None:
    """Past the check, binding fails only because the address is not on this machine."""
    options: list[Any] = ["--insecure"]
    if secured == "curve":
        allowed = allow(keys, tmp_path / "a", "source")
        options = ["--curve-secret", keys / "stage.key_secret", "--curve-allow", allowed,
                   "--curve-server-key", keys / "sink.key"]  # fmt: skip
    proc, log = spawn("stage", [
        "stage", "stages:add_one", "--pull", f"tcp://{NOT_HERE}:5999",
        "--push", "tcp://127.0.0.1:5998", *options,
    ])  # fmt: skip
    assert proc.wait(timeout=30) == worker_cli.EXIT_ADDRESS, log.read_text()
    assert log.read_text().splitlines()[-1] == (
        f"pystream-worker: error: Cannot assign requested address (addr='tcp://{NOT_HERE}:5999')"
    )


def test_parallelize_refuses_a_non_loopback_endpoint_without_curve_or_insecure() -> None:
    pipeline = Pipeline()
    pipeline.add(stages.add_one)
    with pytest.raises(SecurityError, match=re.escape(f"refusing to bind tcp://{NOT_HERE}:*")):
        pipeline.parallelize(endpoint=f"tcp://{NOT_HERE}")
    assert issubclass(SecurityError, ValueError)
    # insecure=True: past the check, the bind fails as the address is not this machine's
    with pytest.raises(zmq.ZMQError, match="Cannot assign requested address"):
        pipeline.parallelize(endpoint=f"tcp://{NOT_HERE}", insecure=True)
    with pytest.raises(ValueError, match="endpoint must be 'tcp://HOST'"):
        pipeline.parallelize(endpoint=f"tcp://{HOST_A}:5000")  # the ports are the OS's choice


# -- key files -------------------------------------------------------------------------------
def test_keys_generate_writes_private_secrets_and_never_overwrites(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "keys"
    old_umask = os.umask(0)  # the modes must not depend on the umask
    try:
        result = CliRunner().invoke(cli.main, ["keys", "generate", str(folder), "camera", "gpu"])
    finally:
        os.umask(old_umask)
    assert result.exit_code == 0, result.output
    assert folder.stat().st_mode & 0o777 == 0o700
    for name in ("camera", "gpu"):
        assert (folder / f"{name}.key_secret").stat().st_mode & 0o777 == 0o600
        assert (folder / f"{name}.key").stat().st_mode & 0o777 == 0o644
        public, secret = security.load_key_pair(folder / f"{name}.key_secret")
        assert zmq.curve_public(secret) == public  # a real key pair
        assert zmq.auth.load_certificate(folder / f"{name}.key") == (public, None)
    assert sorted(os.listdir(folder)) == ["camera.key", "camera.key_secret", "gpu.key",
                                          "gpu.key_secret"]  # fmt: skip

    before = (folder / "gpu.key_secret").read_bytes()
    result = CliRunner().invoke(cli.main, ["keys", "generate", str(folder), "gpu"])
    assert result.exit_code == 1
    assert "keys exist, not overwritten" in result.output and "--force" in result.output
    assert (folder / "gpu.key_secret").read_bytes() == before
    result = CliRunner().invoke(cli.main, ["keys", "generate", str(folder), "gpu", "--force"])
    assert result.exit_code == 0, result.output
    assert (folder / "gpu.key_secret").read_bytes() != before
    assert (folder / "gpu.key_secret").stat().st_mode & 0o777 == 0o600

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    result = CliRunner().invoke(cli.main, ["keys", "generate", str(shared), "x"])
    assert result.exit_code == 1 and "other users can open it (mode 0755)" in result.output
    assert not list(shared.iterdir())


def test_a_secret_key_others_can_read_is_refused(tmp_path: Path, keys: Path) -> None:
    secret = keys / "stage.key_secret"
    secret.chmod(0o640)
    result = CliRunner().invoke(worker_cli.main, [
        "stage", "stages:add_one", "--pull", "tcp://127.0.0.1:5999",
        "--push", "tcp://127.0.0.1:5998", "--curve-secret", str(secret),
        "--curve-server-key", str(keys / "sink.key"),
        "--curve-allow", str(allow(keys, tmp_path / "a", "source")),
    ])  # fmt: skip
    assert result.exit_code == worker_cli.EXIT_USAGE
    assert f"can be read by other users (mode 0640); chmod 600 {secret}" in result.output


# -- the Python API over tcp -----------------------------------------------------------------
def test_python_api_over_tcp_with_curve(tmp_path: Path) -> None:
    """Two stages over tcp on 127.0.0.2 under CURVE give the right outputs; the links refuse
    a plaintext client and a key that is not the run's."""
    pipeline = Pipeline()
    pipeline.add(stages.add_one, "One")
    pipeline.add(stages.double, "Two")
    with pipeline:
        pipeline.parallelize(endpoint=f"tcp://{HOST_A}", curve=True, block_output=True)
        bound = pipeline.stats().endpoints
        assert set(bound) == {"control", "status", "in0.0-0", "in1.0-0", "sink-0"}
        assert all(re.fullmatch(rf"tcp://{re.escape(HOST_A)}:\d+", e) for e in bound.values())
        outputs = []
        for x in range(5):
            assert pipeline.forward({"x": x})
            outputs.append(pipeline.get_results())
        assert outputs == [{"x": (x + 1) * 2} for x in range(5)]

        stranger = tmp_path / "stranger"
        security.generate(stranger, ["s"])
        server = tmp_path / "server.key"
        run_key = pipeline.stats().curve_public_key
        assert run_key is not None
        server.write_text(f'curve\n    public-key = "{run_key.decode()}"\n')
        with curve_context(None) as ctx:
            kinds = {
                "in1.0-0": zmq.PUSH, "sink-0": zmq.PUSH, "control": zmq.DEALER,
                "status": zmq.PUSH,
            }  # fmt: skip
            opened = []  # until ctx.destroy() closes them
            for name, kind in kinds.items():
                opened.append(client(ctx, bound[name], kind=kind))
                wait_event(opened[-1][1], PLAINTEXT_REFUSED)
                opened.append(client(ctx, bound[name], stranger / "s.key_secret", server, kind))
                wait_event(opened[-1][1], zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        assert pipeline.forward({"x": 10})
        assert pipeline.get_results() == {"x": 22}
        counters = pipeline.stats()
        assert counters.delivered == counters.forwarded == 6
        assert counters.decode_errors == 0


def test_a_killed_worker_rejoins_on_its_tcp_port() -> None:
    """A restarted worker binds the port its first process had, so its sender reconnects."""
    pipeline = Pipeline()
    pipeline.add(stages.add_one, "One")
    pipeline.add(stages.double, "Two")
    with pipeline:
        pipeline.parallelize(
            endpoint=f"tcp://{HOST_A}", curve=True, block_output=True, output_timeout=2
        )
        endpoint = pipeline.stats().endpoints["in0.0-0"]
        assert pipeline.forward({"x": 1}) and pipeline.get_results() == {"x": 4}
        os.kill(pipeline.stats().workers[0].pid, signal.SIGKILL)

        def restarted() -> bool:
            worker = pipeline.stats().workers[0]
            return worker.restarts == 1 and worker.alive

        assert wait_until(restarted)
        assert pipeline.stats().endpoints["in0.0-0"] == endpoint

        def flows() -> bool:  # an item sent into the dying connection may be lost: again
            return pipeline.forward({"x": 2}) and pipeline.get_results() == {"x": 6}

        assert wait_until(flows, timeout=15)


# -- a chain of pystream-worker processes across hosts ---------------------------------------
@pytest.fixture
def netns() -> Iterator[tuple[str, str, str]]:
    """(namespace, address in it, address on this side): a network namespace joined to this
    one by a veth pair, with a /30 of its own. Skips where namespaces cannot be made."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    pid = os.getpid()
    name, here, there = f"pst{pid}", f"pst{pid}h", f"pst{pid}n"
    net = f"10.231.{(pid >> 6) & 255}"  # a /30 per test process, from its pid
    host, peer = f"{net}.{(pid & 63) * 4 + 1}", f"{net}.{(pid & 63) * 4 + 2}"
    created = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if created.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {created.stderr.strip()}")
    try:
        for command in (
            f"ip link add {here} type veth peer name {there}",
            f"ip link set {there} netns {name}",
            f"ip addr add {host}/30 dev {here}",
            f"ip link set {here} up",
            f"ip -n {name} addr add {peer}/30 dev {there}",
            f"ip -n {name} link set {there} up",
            f"ip -n {name} link set lo up",
        ):
            subprocess.run(command.split(), check=True, capture_output=True)
        yield name, peer, host
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)  # the veth goes too
        subprocess.run(["ip", "link", "del", here], capture_output=True)


@pytest.mark.parametrize("hosts", ["loopback", "netns"])
def test_a_chain_of_workers_across_hosts_under_curve(
    hosts: str, request: pytest.FixtureRequest, tmp_path: Path, keys: Path, spawn: Spawn
) -> None:
    """source and sink on one host, the stage on another; every link CURVE, the profile
    link too. With a namespace, the stage binds an address that is not loopback."""
    prefix: tuple[str, ...] = ()
    if hosts == "netns":
        namespace, stage_host, sink_host = request.getfixturevalue("netns")
        prefix = ("ip", "netns", "exec", namespace)
    else:
        stage_host, sink_host = HOST_A, HOST_B
    stage_in = f"tcp://{stage_host}:{free_port(HOST_A)}"  # in a namespace of its own: free
    sink_in, profile = (f"tcp://{sink_host}:{free_port(sink_host)}" for _ in range(2))
    profiles = tmp_path / "profiles"
    sink, sink_log = spawn("sink", [
        "sink", "--pull", sink_in, "--profile-pull", profile, "--stages", "One",
        "--profile-dir", profiles, "--report-every", "0.1", "--curve-secret",
        keys / "sink.key_secret", "--curve-allow", allow(keys, tmp_path / "a", "stage"),
    ])  # fmt: skip
    stage, stage_log = spawn("stage", [
        "stage", "stages:add_one", "--name", "One", "--pull", stage_in, "--push", sink_in,
        "--profile", profile, "--curve-secret", keys / "stage.key_secret",
        "--curve-allow", allow(keys, tmp_path / "b", "source"),
        "--curve-server-key", keys / "sink.key", "--curve-profile-key", keys / "sink.key",
    ], prefix)  # fmt: skip
    source, source_log = spawn("source", [
        "source", "stages:tiny", "--period", "0.005", "--push", stage_in,
        "--curve-secret", keys / "source.key_secret", "--curve-server-key", keys / "stage.key",
    ])  # fmt: skip

    def received() -> int:
        counts = re.findall(r"(\d+) items received", sink_log.read_text())
        assert stage.poll() is None, stage_log.read_text()
        return int(counts[-1]) if counts else 0

    assert wait_until(lambda: received() >= 20, timeout=30), sink_log.read_text()
    for proc in (source, stage, sink):
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(timeout=10) for proc in (source, stage, sink)] == [0, 0, 0]
    assert "(CURVE)" in stage_log.read_text()
    sent = re.search(r"stopped after (\d+) items", source_log.read_text())
    got = re.search(r"stopped after (\d+) items", sink_log.read_text())
    assert sent and got and int(got.group(1)) == int(sent.group(1)) >= 20
    with contextlib.closing(sqlite3.connect(profiles / DB_FILENAME)) as db:
        (events,) = db.execute(
            "SELECT count(*) FROM events WHERE path = 'MainPipeline__One'"
        ).fetchone()
    assert 0 < events <= int(sent.group(1))
