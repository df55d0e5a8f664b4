"""Programs outside PyStream on either end of a pystream-worker: a plain pyzmq script that
sends msgpack-numpy frames feeds a stage or a sink (``--input-format msgpack-numpy``), and a
stage sends msgpack-numpy frames to a plain receiver (``--output-format msgpack-numpy``).

The foreign frames are decoded by our own checks, never by msgpack-numpy's decoder: every
hostile frame of the corpus (tests/corpus/fmn_*) is one counted DecodeError in a real
worker, which carries on, and no pickle runs in it (an audit hook would end it).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import msgpack
import msgpack_numpy
import numpy as np
import pytest
import zmq
from click.testing import CliRunner
from conftest import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pystream_zmq.cli import worker as worker_cli
from pystream_zmq.errors import DecodeError, ItemTooLargeError, UnsupportedTypeError
from pystream_zmq.wire import codec, foreign_codec, transport

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
TIMEOUT_MS = 20_000  # a worker process starting on a loaded machine

FOREIGN = {
    path.stem: entry["frames"]
    for path in sorted(CORPUS_DIR.glob("fmn_*.msgpack"))
    if (entry := msgpack.unpackb(path.read_bytes(), raw=False))["target"] == "msgpack-numpy"
}


def packb(item: Any) -> bytes:
    """What the usual hand-written camera script sends."""
    return msgpack.packb(item, default=msgpack_numpy.encode)  # type: ignore[no-any-return]


def unpackb(frame: bytes) -> Any:
    """What the usual hand-written receiver does (never on untrusted input)."""
    return msgpack.unpackb(frame, object_hook=msgpack_numpy.decode)


def assert_same(got: Any, want: Any) -> None:
    """Equal, and of the same types all the way down (dtype and shape for arrays)."""
    assert type(got) is type(want), (got, want)
    if isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    elif isinstance(want, (np.ndarray, np.generic)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want, equal_nan=want.dtype.kind in "fc")
    else:
        assert got == want


def arrays_in(value: Any) -> Iterator[np.ndarray[Any, Any]]:
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, (dict, list)):
        for inner in value.values() if isinstance(value, dict) else value:
            yield from arrays_in(inner)


def sample_items() -> list[Any]:
    rng = np.random.default_rng(3)
    return [
        {"image": rng.integers(0, 256, (240, 320, 3), dtype=np.uint8), "id": 7, "t": 0.5},
        {
            "mask": rng.random((4, 5)) > 0.5,
            "ints": [np.arange(-3, 3, dtype=t) for t in ("i1", "i2", "i4", "i8")],
            "uints": [np.arange(6, dtype=t) for t in ("u1", "u2", "u4", "u8")],
            "floats": [np.linspace(-1, 1, 7, dtype=t) for t in ("f2", "f4", "f8")],
            "complex": np.array([1 + 2j, np.nan], dtype="c16"),
            "big_endian": np.arange(5, dtype=">i4"),
            "zero_d": np.array(2.5),
            "empty": np.zeros((0, 3), np.float32),
            "strided": np.arange(20, dtype=np.int16).reshape(4, 5)[:, ::2],
        },
        {
            "scalars": [np.float32(1.5), np.int64(-2), np.uint8(255), np.bool_(True)],
            "more": [np.complex64(3 - 1j), np.float16(0.25)],
            "z": 1 - 2j,
            "plain": [None, True, 3, -(2**63), 2**64 - 1, 1.25, "text", b"bytes", {"in": []}],
        },
        [np.ones(3), {"nested": {"deeper": np.zeros((2, 2), np.uint16)}}],
        np.arange(12, dtype=np.float32).reshape(3, 4),
    ]


# -- the two codecs, without sockets ---------------------------------------------------------
@pytest.mark.parametrize("index", range(len(sample_items())))
def test_what_msgpack_numpy_sends_decodes_to_what_it_would_give(index: int) -> None:
    item = sample_items()[index]
    frame = packb(item)
    got = foreign_codec.decode([frame])
    assert_same(got, unpackb(frame))
    for arr in arrays_in(got):  # the receiver's own: a stage may write into them
        assert arr.flags.writeable and arr.flags.owndata and not np.shares_memory(arr, frame)


@pytest.mark.parametrize("index", range(len(sample_items())))
def test_what_we_send_msgpack_numpy_reads_back(index: int) -> None:
    item = sample_items()[index]
    frame = foreign_codec.encode(item)
    assert_same(unpackb(frame), unpackb(packb(item)))  # as msgpack-numpy's own encoder
    assert_same(foreign_codec.decode([frame]), unpackb(frame))


def test_what_cannot_be_sent_is_refused_by_name() -> None:
    refused: list[tuple[Any, str]] = [
        ({"a": np.array([1, None], dtype=object)}, "dtype object"),
        ({"a": np.zeros(2, [("x", "f4")])}, "numpy array of dtype"),
        ({"a": np.array(["x"])}, "dtype <U1"),
        ({"a": {1, 2}}, "cannot send a set"),
        ({"a": np.ma.masked_array([1, 2])}, "cannot send a MaskedArray"),
        ({"a": np.datetime64("2024-01-01")}, "cannot send a datetime64"),
        ({"a": 2**64}, "int of 65 bits"),
    ]
    for item, message in refused:
        with pytest.raises(UnsupportedTypeError, match=message):
            foreign_codec.encode(item)
    nested: list[Any] = []
    for _ in range(5000):  # past what msgpack packs
        nested = [nested]
    with pytest.raises(UnsupportedTypeError, match="cannot send as msgpack-numpy"):
        foreign_codec.encode(nested)
    with pytest.raises(ItemTooLargeError, match="over the 1000-byte message limit"):
        foreign_codec.encode({"a": np.zeros(1000, np.uint8)}, max_message_bytes=1000)


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_corpus_frames_raise_decode_error(name: str) -> None:
    with pytest.raises(DecodeError):
        foreign_codec.decode(FOREIGN[name])


def test_the_size_cap_and_container_cap_hold() -> None:
    frame = packb({"a": np.zeros(2000, np.uint8)})
    with pytest.raises(DecodeError, match="over the 1000"):
        foreign_codec.decode([frame], max_message_bytes=1000)
    with pytest.raises(DecodeError, match="exceeds max_array_len"):
        foreign_codec.decode([packb(list(range(11)))], max_container_len=10)
    assert foreign_codec.decode([packb(list(range(10)))], max_container_len=10) == list(range(10))


@settings(
    max_examples=2000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    st.sampled_from([packb(item) for item in sample_items()[1:]]),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
    st.integers(0, 10**6),
)
def test_fuzz_flipped_and_cut_frames_raise_only_decode_error(
    frame: bytes, flips: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(frame)
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    del data[len(data) - cut % 8 :]
    try:
        out = foreign_codec.decode([bytes(data)])
    except DecodeError:
        return
    for arr in arrays_in(out):
        assert arr.dtype.kind in "biufc" and arr.flags.writeable


# -- real processes ------------------------------------------------------------------------------
SENDER = r"""
# A plain camera script: pyzmq and msgpack-numpy, nothing of PyStream.
import sys
import msgpack, msgpack_numpy, numpy as np, zmq

endpoint, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ctx = zmq.Context()
sock = ctx.socket(zmq.PUSH)
sock.connect(endpoint)
rng = np.random.default_rng(seed)
for i in range(count):
    image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    item = {"image": image, "id": i, "scale": np.float32(i / 2), "tags": ("cam", i)}
    sock.send(msgpack.packb(item, default=msgpack_numpy.encode))
print("sent", count, flush=True)
sys.stdin.read()  # stay connected until told: closing a sender can lose what it sent last
sock.close(linger=0)
ctx.term()
"""

# Ends the process at the first unpickling of anything: the audit event of every global an
# unpickler looks up, and pickle.loads/load called through the module.
AUDIT = r"""
import os, pickle, sys

def caught(what):
    os.write(2, f"PICKLE RAN: {what}\n".encode())
    os._exit(97)

def hook(event, args):
    if event == "pickle.find_class":
        caught(f"find_class {args[:2]}")

sys.addaudithook(hook)
for name in ("loads", "load"):
    setattr(pickle, name, lambda *a, _name=name, **k: caught(_name))
"""
WORKER_UNDER_AUDIT = AUDIT + "from pystream_zmq.cli.worker import main\nmain()\n"


def camera_items(count: int, seed: int) -> list[dict[str, Any]]:
    """What SENDER sends, as its receiver should get it (msgpack has no tuple)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        items.append({"image": image, "id": i, "scale": np.float32(i / 2), "tags": ["cam", i]})
    return items


SEED = 11
EXPECTED = camera_items(8, SEED)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tcp(port: int) -> str:
    return f"tcp://127.0.0.1:{port}"


class Processes:
    """The processes a test starts, each with its output in a file; stopped in teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}

    def start(self, name: str, args: list[Any], **kwargs: Any) -> subprocess.Popen[bytes]:
        with self.log_path(name).open("wb") as log:
            kwargs.setdefault("env", self.env)
            proc = subprocess.Popen(
                [str(arg) for arg in args], stdout=log, stderr=log, cwd=self.tmp_path, **kwargs
            )
        self.procs[name] = proc
        return proc

    def worker(self, name: str, *args: Any, audited: bool = False) -> subprocess.Popen[bytes]:
        if audited:
            return self.start(name, [sys.executable, "-c", WORKER_UNDER_AUDIT, *args])
        return self.start(name, [BIN / "pystream-worker", *args])

    def sender(self, endpoint: str, count: int) -> subprocess.Popen[bytes]:
        script = self.tmp_path / "camera.py"
        script.write_text(SENDER)
        plain = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return self.start(
            "camera",
            [sys.executable, script, endpoint, count, SEED],
            stdin=subprocess.PIPE,
            env=plain,
        )

    def log_path(self, name: str) -> Path:
        return self.tmp_path / f"{name}.log"

    def log(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"-- {name}:\n{self.log(name)}" for name in self.procs)

    def stop(self, name: str) -> int:
        """SIGTERM, then its exit code (a sender's stdin is closed instead)."""
        proc = self.procs[name]
        if proc.stdin is not None:
            proc.stdin.close()
        else:
            proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=15)

    def cleanup(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.cleanup()


class Sockets:
    """The test's own sockets, on random loopback ports, closed in teardown."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.made: list[zmq.Socket[Any]] = []

    def open_socket(self, kind: int) -> zmq.Socket[Any]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        self.made.append(sock)
        return sock

    def pull(self, port: int) -> zmq.Socket[Any]:
        sock = self.open_socket(zmq.PULL)
        sock.bind(tcp(port))
        return sock

    def push(self, port: int) -> zmq.Socket[Any]:
        sock = self.open_socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDTIMEO, TIMEOUT_MS)
        sock.connect(tcp(port))
        return sock

    def close(self) -> None:
        for sock in self.made:
            sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    made = Sockets()
    yield made
    made.close()


def receive(sock: zmq.Socket[Any], what: str, processes: Processes) -> list[bytes]:
    """One message, or a failure naming what did not come, with the processes' logs."""
    if not sock.poll(TIMEOUT_MS):
        raise AssertionError(f"no {what} within {TIMEOUT_MS} ms\n{processes.logs()}")
    return sock.recv_multipart()


def ours(frames: list[bytes]) -> tuple[int, int, Any]:
    """(kind, seq, item) of a message in our own format."""
    kind, seq, _ = transport.unpack_envelope(frames[0])
    item = codec.decode(transport.payload(frames)) if kind == transport.KIND_DATA else None
    return kind, seq, item


def good(x: int) -> list[bytes]:
    return transport.pack_message(transport.KIND_DATA, x, 0.0, codec.encode({"x": x}))


def malformed_logged(text: str) -> int:
    """'dropped a malformed message' lines in full, and those summaries say were left out."""
    count = 0
    for line in text.splitlines():
        if "dropped a malformed message" in line:
            summary = re.search(r"(\(and )?(\d+) more like this in the last", line)
            left_out = int(summary.group(2)) if summary else 0
            count += left_out + (0 if summary and not summary.group(1) else 1)
    return count


def test_a_plain_msgpack_numpy_script_feeds_a_stage(processes: Processes, sockets: Sockets) -> None:
    """The camera script's frames reach the stage as the objects msgpack-numpy would give,
    writeable (the stage draws into the image), numbered 0, 1, ... by the stage, and go on
    in our own format."""
    in_port, out_port = free_port(), free_port()
    downstream = sockets.pull(out_port)
    stage = processes.worker(
        "stage", "stage", "stages:draw", "--input-format", "msgpack-numpy",
        "--pull", tcp(in_port), "--push", tcp(out_port),
    )  # fmt: skip
    processes.sender(tcp(in_port), len(EXPECTED))
    for seq, want in enumerate(EXPECTED):
        kind, got_seq, item = ours(receive(downstream, f"item {seq}", processes))
        assert (kind, got_seq) == (transport.KIND_DATA, seq)
        drawn = {**want, "image": want["image"].copy()}
        drawn["image"][0, 0] = 255
        assert_same(item, drawn)
    assert stage.poll() is None
    assert processes.stop("stage") == 0, processes.log("stage")
    log = processes.log("stage")
    assert f"stopped after {len(EXPECTED)} items" in log, log
    assert "no end of stream" not in log  # a foreign sender has none: it was not waited for
    assert processes.stop("camera") == 0, processes.log("camera")


def test_a_stage_sends_msgpack_numpy_to_a_plain_receiver(
    processes: Processes, sockets: Sockets
) -> None:
    """The receiver decodes with msgpack-numpy and gets every item, one frame each; the
    marker of the item the stage dropped, and the end of stream at the stop, stay out."""
    in_port, out_port = free_port(), free_port()
    receiver = sockets.pull(out_port)
    stage = processes.worker(
        "stage", "stage", "stages:FailOn", "--param", "bad=3", "--output-format",
        "msgpack-numpy", "--pull", tcp(in_port), "--push", tcp(out_port),
    )  # fmt: skip
    upstream = sockets.push(in_port)
    items = [
        {"x": x, "frame": np.full((64, 80), x, np.uint16), "gain": np.float32(x)} for x in range(6)
    ]
    for seq, item in enumerate(items):
        upstream.send_multipart(
            transport.pack_message(transport.KIND_DATA, seq, 0.0, codec.encode(item))
        )
    for want in (item for item in items if item["x"] != 3):
        frames = receive(receiver, f"item {want['x']}", processes)
        assert len(frames) == 1
        assert_same(unpackb(frames[0]), want)
    assert processes.stop("stage") == 0, processes.log("stage")
    assert stage.returncode == 0
    assert not receiver.poll(200), receiver.recv()  # no marker came, even at the stop
    log = processes.log("stage")
    assert "stopped after 5 items (1 stage errors)" in log, log
    assert "did not stop in time" not in log and "nobody downstream" not in log


def test_hostile_msgpack_numpy_is_one_counted_decode_error_each_and_no_pickle_runs(
    processes: Processes, sockets: Sockets
) -> None:
    """Every corpus frame, each followed by a good one, at a stage under an audit hook: one
    DecodeError each (logged, and a dropped marker in its place downstream, so the sink
    counts it dropped), the good one after it processed with the next number, no pickle."""
    in_port, out_port = free_port(), free_port()
    downstream = sockets.pull(out_port)
    stage = processes.worker(
        "stage", "stage", "stages:add_one", "--input-format", "msgpack-numpy",
        "--pull", tcp(in_port), "--push", tcp(out_port), audited=True,
    )  # fmt: skip
    upstream = sockets.push(in_port)
    upstream.send(packb({"x": 0}))
    names = sorted(FOREIGN)
    for x, name in enumerate(names, 1):
        upstream.send_multipart(FOREIGN[name])
        upstream.send(packb({"x": x}))
    assert ours(receive(downstream, "the first item", processes)) == (
        transport.KIND_DATA,
        0,
        {"x": 1},
    )
    for x, name in enumerate(names, 1):
        dropped = ours(receive(downstream, f"the marker of {name}", processes))
        assert dropped == (transport.KIND_DROPPED, 2 * x - 1, None), name
        after = ours(receive(downstream, f"the item after {name}", processes))
        assert after == (transport.KIND_DATA, 2 * x, {"x": x + 1}), name
    assert stage.poll() is None, processes.log("stage")
    assert processes.stop("stage") == 0, processes.log("stage")
    log = processes.log("stage")
    assert "PICKLE RAN" not in log
    assert malformed_logged(log) == len(names), log
    assert f"stopped after {len(names) + 1} items" in log, log


def test_the_audit_hook_sees_msgpack_numpy_unpickle_the_corpus(tmp_path: Path) -> None:
    """The hook of the test above would have caught it: msgpack-numpy's own decoder on the
    kind-O frame unpickles, and the process ends with the hook's code."""
    frame = tmp_path / "frame"
    frame.write_bytes(FOREIGN["fmn_kind_O_pickle"][0])
    decode = "import msgpack, msgpack_numpy\n" + (
        "msgpack.unpackb(open(sys.argv[1], 'rb').read(), object_hook=msgpack_numpy.decode)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", AUDIT + decode, str(frame)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 97, result.stderr
    assert "PICKLE RAN" in result.stderr


def test_a_plain_script_feeds_a_sink_that_saves_its_images(
    processes: Processes, sockets: Sockets
) -> None:
    """The sink reads msgpack-numpy too: it counts the camera's frames, saves the last image,
    counts a pickle-bearing frame as one malformed output, and stops at once when asked."""
    port = free_port()
    latest = processes.tmp_path / "latest.png"
    sink = processes.worker(
        "sink", "sink", "--input-format", "msgpack-numpy", "--pull", tcp(port),
        "--report-every", "0.05", "--save-latest", latest,
    )  # fmt: skip
    rogue = sockets.push(port)
    rogue.send_multipart(FOREIGN["fmn_kind_O_pickle"])
    processes.sender(tcp(port), len(EXPECTED))

    def received() -> int:
        counts = re.findall(r"(\d+) items received", processes.log("sink"))
        return int(counts[-1]) if counts else 0

    def saved_last() -> bool:  # written through a temporary file: never half an image
        return latest.exists() and np.array_equal(cv2.imread(str(latest)), EXPECTED[-1]["image"])

    assert wait_until(lambda: received() == len(EXPECTED), 30), processes.log("sink")
    assert wait_until(saved_last, 10)
    # The rogue's frame came on a connection of its own: it may be read after the 8 items.
    assert wait_until(lambda: "dropped a malformed output" in processes.log("sink"), 10)
    assert processes.stop("sink") == 0, processes.log("sink")
    assert sink.returncode == 0
    log = processes.log("sink")
    assert log.count("dropped a malformed output") == 1, log
    assert "no end of stream" not in log
    assert processes.stop("camera") == 0


def test_the_formats_on_the_command_line() -> None:
    for role in ("stage", "pipeline"):
        out = CliRunner().invoke(worker_cli.main, [role, "--help"])
        assert "--input-format [pystream|msgpack-numpy]" in out.output
        assert "--output-format [pystream|msgpack-numpy]" in out.output
        assert "PYSTREAM_INPUT_FORMAT" in out.output and "PYSTREAM_OUTPUT_FORMAT" in out.output
    out = CliRunner().invoke(worker_cli.main, ["sink", "--help"])
    assert "--input-format" in out.output and "--output-format" not in out.output
    result = CliRunner().invoke(
        worker_cli.main,
        ["stage", "stages:add_one", "--input-format", "msgpack-numpy", "--replica", "0",
         "--pull", "tcp://127.0.0.1:5999", "--push", "tcp://127.0.0.1:5998"],
    )  # fmt: skip
    assert result.exit_code == worker_cli.EXIT_USAGE, result.output
    assert "numbers the items: no --replica" in result.output
