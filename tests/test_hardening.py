"""Hostile bytes on every socket a worker or the orchestrator reads: each bad message is a
counted, logged DecodeError (or a counted drop), and the next good message still flows.

Pure targets are fuzzed (codec.decode, transport.unpack_envelope, events.unpack_events);
the regression corpus in tests/corpus/ is replayed through the pure functions and through a
live Worker; an audit hook shows no pickle runs on received bytes; a real pystream-worker
takes garbage on its tcp port from raw sockets and from a ZeroMQ PUSH.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from conftest import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stages import add_one

from pystream_zmq import Pipeline
from pystream_zmq.errors import DecodeError
from pystream_zmq.orchestrator.runner import Collector
from pystream_zmq.profiling.events import pack_events, unpack_events
from pystream_zmq.stage import Event
from pystream_zmq.wire import codec, transport
from pystream_zmq.worker.loop import Worker
from pystream_zmq.worker.spec import WorkerSpec

REPO = Path(__file__).resolve().parent.parent
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
BIN = Path(sys.executable).parent
TIMEOUT_MS = 5000


def load_corpus() -> dict[str, dict[str, Any]]:
    entries = {
        path.stem: msgpack.unpackb(path.read_bytes(), raw=False)
        for path in sorted(CORPUS_DIR.glob("*.msgpack"))
    }
    assert len(entries) >= 25, "tests/corpus/make_corpus.py has not been run"
    return entries


CORPUS = load_corpus()
MESSAGES = {name: e["frames"] for name, e in CORPUS.items() if e["target"] == "message"}
EVENT_BATCHES = {name: e["frames"][0] for name, e in CORPUS.items() if e["target"] == "events"}


def good_message(x: int) -> list[Any]:
    return transport.pack_message(transport.KIND_DATA, x, time.time(), codec.encode({"x": x}))


def decode_message(frames: list[Any]) -> object:
    """What a worker does with a received data message (an end-of-stream needs no decode)."""
    kind, _, _ = transport.unpack_envelope(frames[0])
    return codec.decode(transport.payload(frames)) if kind == transport.KIND_DATA else None


# -- the regression corpus, through the pure functions ----------------------------------------


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_corpus_messages_raise_decode_error(name: str) -> None:
    with pytest.raises(DecodeError):
        decode_message(MESSAGES[name])


@pytest.mark.parametrize("name", sorted(EVENT_BATCHES))
def test_corpus_event_batches_raise_decode_error(name: str) -> None:
    with pytest.raises(DecodeError):
        unpack_events(EVENT_BATCHES[name])


def test_msgpack_numpy_as_it_is_on_the_wire_never_becomes_an_array() -> None:
    """msgpack-numpy's own frames (a map with bytes keys) are plain data to our decoder: the
    codec lets bytes keys pass by design, so this is an inert dict, never pickle or numpy."""
    import msgpack_numpy

    for arr in (np.array([1, None], dtype=object), np.zeros(3, "S1"), np.zeros(2)):
        frame = msgpack.packb({"img": arr}, default=msgpack_numpy.encode)
        out = codec.decode([frame])
        assert isinstance(out, dict)
        inner = out["img"]
        assert isinstance(inner, dict) and all(type(k) is bytes for k in inner)
        assert not any(isinstance(v, np.ndarray) for v in inner.values())


# -- fuzz: 10,000 mutated valid frames over the three pure decoders -----------------------------

VALID = {
    "message": [
        good_message(1),
        transport.pack_message(
            transport.KIND_DATA,
            2,
            0.0,
            codec.encode({"img": np.arange(70_000, dtype=np.uint8), "t": (1, np.float32(2.5))}),
        ),
        [transport.pack_envelope(transport.KIND_EOS, 3, 0.0)],
    ],
    "events": [
        [pack_events([("MainPipeline__A", 1, 0.5, 1.0, 2.0), ("B", 2, 3, 4, 5)])],
        [pack_events([])],
    ],
}


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    target = draw(st.sampled_from(sorted(VALID)))
    frames = [bytes(f) for f in draw(st.sampled_from(VALID[target]))]
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "drop", "add"]))
        if not frames or op == "add":
            frames.insert(draw(st.integers(0, len(frames))), draw(st.binary(max_size=32)))
            continue
        i = draw(st.integers(0, len(frames) - 1))
        frame = frames[i]
        pos = draw(st.integers(0, max(0, len(frame) - 1)))
        if op == "flip" and frame:
            frame = frame[:pos] + bytes([frame[pos] ^ draw(st.integers(1, 255))]) + frame[pos + 1 :]
        elif op == "insert":
            frame = frame[:pos] + draw(st.binary(min_size=1, max_size=9)) + frame[pos:]
        elif op == "delete":
            frame = frame[:pos] + frame[pos + draw(st.integers(1, 9)) :]
        elif op == "truncate":
            frame = frame[:pos]
        elif op == "drop":
            del frames[i]
            continue
        frames[i] = frame
    return target, frames


@settings(
    max_examples=10_000,
    deadline=None,
    database=None,  # CI runs the same budget each time; the corpus keeps what was found
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutated())
def test_fuzz_mutated_frames_raise_only_decode_error(case: tuple[str, list[bytes]]) -> None:
    target, frames = case
    try:
        if target == "events":
            if len(frames) != 1:
                return  # the collector reads exactly one payload frame
            events = unpack_events(frames[0])
            assert all(type(e[0]) is str and type(e[1]) is int for e in events)
        else:
            if not frames:
                return  # ZeroMQ never delivers a message of no frames
            out = decode_message(frames)
            if isinstance(out, dict):
                for value in out.values():
                    if isinstance(value, np.ndarray):
                        assert value.dtype.kind in "biufc" and value.flags.writeable
    except DecodeError:
        pass


# -- a live Worker, in this process -----------------------------------------------------------


class LiveWorker:
    """A standalone Worker on a thread: ``upstream`` feeds its tcp input, ``downstream``
    reads its output. Tests send hostile messages from other sockets."""

    def __init__(self, ctx: zmq.Context[Any], **spec: Any) -> None:
        self.ctx = ctx
        self.downstream = ctx.socket(zmq.PULL)
        self.downstream.bind("inproc://hardening-out")
        self.worker = Worker(
            WorkerSpec(
                name="W", pull="tcp://127.0.0.1:*", push="inproc://hardening-out",
                profile=None, **spec,
            ),
            [("MainPipeline__W", add_one)],
            ctx,
        )  # fmt: skip
        self.endpoint = self.worker.pull.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.port = int(self.endpoint.rsplit(":", 1)[1])
        self.upstream = self.connect()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(
            target=self.worker.run, kwargs={"done": self.stop_event.is_set}
        )
        self.thread.start()

    def connect(self, kind: int = zmq.PUSH) -> zmq.Socket[Any]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, TIMEOUT_MS)
        sock.connect(self.endpoint)
        return sock

    def flows(self, x: int) -> None:
        """A good item through the normal upstream arrives, processed, within the deadline."""
        self.upstream.send_multipart(good_message(x))
        assert self.downstream.poll(TIMEOUT_MS), "the worker stalled"
        frames = self.downstream.recv_multipart()
        assert transport.unpack_envelope(frames[0])[1] == x
        assert codec.decode(transport.payload(frames)) == {"x": x + 1}

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


class _Context(zmq.Context):  # type: ignore[type-arg]
    """Keeps every socket it made, so the test's end closes them (an unclosed socket that
    is garbage-collected warns, and warnings are errors)."""

    made: list[zmq.Socket[Any]]

    def socket(self, *args: Any, **kwargs: Any) -> Any:
        sock = super().socket(*args, **kwargs)
        sock.setsockopt(zmq.LINGER, 0)
        self.made.append(sock)
        return sock


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context = _Context()
    context.made = []
    yield context
    context.destroy(linger=0)


@pytest.fixture
def live(ctx: zmq.Context[Any]) -> Iterator[LiveWorker]:
    worker = LiveWorker(ctx)
    yield worker
    worker.stop()


def test_every_corpus_message_is_counted_logged_and_the_next_item_flows(
    live: LiveWorker, ctx: zmq.Context[Any], caplog: pytest.LogCaptureFixture
) -> None:
    live.flows(0)
    rogue = live.connect()
    for count, (name, frames) in enumerate(sorted(MESSAGES.items()), 1):
        caplog.clear()
        with caplog.at_level(logging.WARNING, "pystream_zmq.worker"):
            rogue.send_multipart(frames)
            # The counter goes up just before the log line: wait for both.
            assert wait_until(lambda: "dropped a malformed message" in caplog.text, 5), name
            assert live.worker.counters["decode_errors"] == count, name
        live.flows(count)
    assert live.worker.counters["processed"] == len(MESSAGES) + 1


def test_truncated_and_odd_multipart_shapes(live: LiveWorker) -> None:
    """Frame counts a socket can deliver: envelope only, an empty first frame, many
    frames, an end-of-stream marker with junk after it (routed on, not decoded)."""
    rogue = live.connect()
    header = codec.encode({"x": 1})[0]
    envelope = transport.pack_envelope(transport.KIND_DATA, 1, 0.0)
    shapes = ([b""], [envelope], [b"", header], [envelope + header, *[b""] * 20_000])
    for frames in shapes:
        before = live.worker.counters["decode_errors"]
        rogue.send_multipart(frames)
        assert wait_until(lambda b=before: live.worker.counters["decode_errors"] == b + 1, 5)
        live.flows(2)
    rogue.send_multipart([transport.pack_envelope(transport.KIND_EOS, 9, 0.0) + b"junk", b"more"])
    assert live.downstream.poll(TIMEOUT_MS)
    assert live.downstream.recv_multipart() == [transport.pack_envelope(transport.KIND_EOS, 9, 0.0)]
    live.flows(3)


def test_a_malformed_batch_is_counted_and_a_batch_s_good_items_flow(live: LiveWorker) -> None:
    rogue = live.connect()
    good = good_message(7)
    assert len(good) == 1  # one frame: what batches hold
    truncated = transport.pack_batch([good[0], good[0]])[:-3]
    odd = transport.pack_envelope(9, 1, 0.0)  # an unknown kind, inside a well-formed batch
    for frames, errors in (([truncated], 1), ([transport.pack_batch([odd, good[0]])], 2)):
        rogue.send_multipart(frames)
        assert wait_until(lambda e=errors: live.worker.counters["decode_errors"] == e, 5)
    assert live.downstream.poll(TIMEOUT_MS)
    frames = live.downstream.recv_multipart()  # the good item of the second batch, alone
    assert transport.unpack_envelope(frames[0])[1] == 7
    assert codec.decode(transport.payload(frames)) == {"x": 8}
    live.flows(8)


def test_the_size_cap_is_configurable_and_enforced_twice(
    ctx: zmq.Context[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A message over the cap in total is a counted DecodeError; one frame over it is refused
    by ZeroMQ (MAXMSGSIZE) before it is allocated, which drops the sender: a counted
    disconnect. The default cap is the codec's."""
    cap = 100_000
    live = LiveWorker(ctx, max_message_bytes=cap)
    try:
        assert live.worker.pull.getsockopt(zmq.MAXMSGSIZE) == cap
        live.flows(0)
        frames = codec.encode({"a": np.zeros(70_000, np.uint8), "b": np.zeros(70_000, np.uint8)})
        rogue = live.connect()
        rogue.send_multipart(transport.pack_message(transport.KIND_DATA, 1, 0.0, frames))
        assert wait_until(lambda: live.worker.counters["decode_errors"] == 1, 5)
        with caplog.at_level(logging.INFO, "pystream_zmq.worker"):
            big = codec.encode({"a": np.zeros(cap + 1, np.uint8)})
            rogue.send_multipart(transport.pack_message(transport.KIND_DATA, 1, 0.0, big))
            # The counter goes up just before the log line: wait for both.
            assert wait_until(lambda: f"sent a frame over {cap} bytes" in caplog.text, 5)
        assert live.worker.counters["input_disconnects"] >= 1
        live.flows(1)
        assert live.worker.counters["decode_errors"] == 1
    finally:
        live.stop()
    default = Worker(
        WorkerSpec(name="D", pull="inproc://d-in", push="inproc://d-out", profile=None), [], ctx
    )
    assert default.pull.getsockopt(zmq.MAXMSGSIZE) == codec.DEFAULT_MAX_MESSAGE_BYTES


def test_unknown_and_malformed_control_commands_do_not_stop_a_worker(
    ctx: zmq.Context[Any], caplog: pytest.LogCaptureFixture
) -> None:
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("inproc://hardening-control")
    dealer = transport.make_socket(ctx, zmq.DEALER, 1000)
    dealer.setsockopt(zmq.ROUTING_ID, b"0")
    dealer.connect("inproc://hardening-control")
    out = ctx.socket(zmq.PULL)
    out.bind("inproc://hardening-out")
    spec = WorkerSpec(
        name="W", pull="inproc://hardening-in", push="inproc://hardening-out", profile=None,
        control="inproc://hardening-control", ident=b"0",
    )  # fmt: skip
    worker = Worker(spec, [("MainPipeline__W", add_one)], ctx)
    upstream = ctx.socket(zmq.PUSH)
    upstream.setsockopt(zmq.LINGER, 0)
    upstream.connect("inproc://hardening-in")
    thread = threading.Thread(target=worker.run, args=(dealer,))
    thread.start()
    try:
        dealer.send(b"hello")  # so the ROUTER knows the route
        assert router.poll(TIMEOUT_MS)
        router.recv_multipart()
        with caplog.at_level(logging.WARNING, "pystream_zmq.worker"):
            for command in ([b""], [os.urandom(2000)], [b"stop\x00"], [b"\xff", b"", b"x"]):
                router.send_multipart([b"0", *command])
            router.send_multipart([b"0", transport.GET_STATE, b"request", b"extra"])
            assert router.poll(TIMEOUT_MS)
            ident, kind, request, sent, *state = router.recv_multipart()
        assert (ident, kind, request, sent) == (b"0", transport.STATE, b"request", bytes(8))
        assert codec.decode(state) == {}
        assert caplog.text.count("ignored unknown control command") == 4
        upstream.send_multipart(good_message(5))
        assert out.poll(TIMEOUT_MS)
        assert codec.decode(transport.payload(out.recv_multipart())) == {"x": 6}
        assert thread.is_alive()
        router.send_multipart([b"0", transport.STOP])
        thread.join(timeout=10)
        assert not thread.is_alive()
    finally:
        if thread.is_alive():
            router.send_multipart([b"0", transport.STOP])
            thread.join(timeout=10)


# -- the orchestrator's side: sink, profile and control sockets -------------------------------


class Recorded:
    """Stands in for RunRecorder: keeps what the collector passes on."""

    def __init__(self) -> None:
        self.batches: list[list[Event]] = []
        self.snapshots: list[Any] = []

    def events(self, events: list[Event]) -> bool:
        self.batches.append(events)
        return True

    def counters(self, counters: Any) -> bool:
        self.snapshots.append(counters)
        return True


def test_collector_counts_garbage_on_sink_and_profile_sockets(
    ctx: zmq.Context[Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorded = Recorded()
    sink, prof = f"ipc://{tmp_path}/sink", f"ipc://{tmp_path}/profile"
    collector = Collector(ctx, [sink], prof, 1000, recorded, lambda: {})  # type: ignore[arg-type]
    collector.start()
    data = ctx.socket(zmq.PUSH)
    profile = ctx.socket(zmq.PUSH)
    for sock, endpoint in ((data, sink), (profile, prof)):
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
    try:
        with caplog.at_level(logging.WARNING, "pystream_zmq.orchestrator"):
            for frames in MESSAGES.values():
                data.send_multipart(frames)
            data.send_multipart(good_message(1))
            assert collector.take_latest(TIMEOUT_MS / 1000) == {"x": 1}
            assert collector.decode_errors == len(MESSAGES)
            bad_profile = [
                *([transport.EVENTS, batch] for batch in EVENT_BATCHES.values()),
                [transport.EVENTS],
                [transport.EVENTS, pack_events([]), b"extra"],
                [transport.COUNTERS, b"\xc1"],
                [transport.COUNTERS, *codec.encode({"p": {"n": "not an int"}})],
                [transport.COUNTERS, *codec.encode([1, 2])],
                [b"bogus", b"x"],
                [os.urandom(64)],
            ]
            for frames in bad_profile:
                profile.send_multipart(frames)
            good = [("MainPipeline__A", 3, 1.0, 2.0, 3.0)]
            profile.send_multipart([transport.EVENTS, pack_events(good)])
            assert wait_until(lambda: recorded.batches == [good], 5), recorded.batches
        assert wait_until(lambda: collector.decode_errors == len(MESSAGES) + len(bad_profile), 5)
        assert caplog.text.count("dropped a malformed output") == len(MESSAGES)
        assert caplog.text.count("dropped malformed profile events") == len(EVENT_BATCHES)
        assert recorded.snapshots == []
    finally:
        collector.stop()


def test_garbage_replies_on_the_control_socket_do_not_break_the_orchestrator(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Something else on the orchestrator's private control endpoint (same user only): its
    messages are logged and ignored; state collection and cleanup still work."""
    pipeline = Pipeline()
    pipeline.add(add_one, "One")
    pipeline.parallelize(block_output=True)
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        endpoint = pipeline.stats().endpoints["control"]
        rogues = []
        for ident in (b"x", b"99", None):
            rogue = ctx.socket(zmq.DEALER)
            rogue.setsockopt(zmq.LINGER, 0)
            # Send only once connected, so the messages are there before cleanup() reads.
            rogue.setsockopt(zmq.IMMEDIATE, 1)
            rogue.setsockopt(zmq.SNDTIMEO, 5000)
            if ident is not None:
                rogue.setsockopt(zmq.ROUTING_ID, ident)
            rogue.connect(endpoint)
            rogue.send_multipart([transport.STATE, b"\xc1"])
            rogue.send(b"")
            rogues.append(rogue)
        assert pipeline.forward({"x": 1})
        assert pipeline.get_results() == {"x": 2}
        with caplog.at_level(logging.WARNING, "pystream_zmq.orchestrator"):
            pipeline.cleanup()
        assert "ignored a control message from unknown peer" in caplog.text
    finally:
        pipeline.cleanup()
        ctx.destroy(linger=0)


# -- no pickle on received bytes --------------------------------------------------------------

AUDIT_SCRIPT = r"""
import pickle, sys, time
calls = []
def hook(event, args):
    if event.startswith("pickle."):
        calls.append((event, repr(args)[:100]))
sys.addaudithook(hook)
for name in ("loads", "load"):
    real = getattr(pickle, name)
    def wrapped(*a, _real=real, _name=name, **k):
        calls.append(("pickle." + _name, ""))
        return _real(*a, **k)
    setattr(pickle, name, wrapped)

sys.path[:0] = [sys.argv[1], sys.argv[2]]
import test_hardening as th
import zmq
from pystream_zmq.wire import codec
from pystream_zmq.profiling.events import unpack_events
from pystream_zmq.errors import DecodeError

ctx = zmq.Context()
live = th.LiveWorker(ctx)
rogue = live.connect()
for frames in th.MESSAGES.values():
    rogue.send_multipart(frames)
received = th.wait_until(lambda: live.worker.counters["decode_errors"] == len(th.MESSAGES), 10)
live.flows(1)
live.stop()
ctx.destroy(linger=0)
for batch in th.EVENT_BATCHES.values():
    try:
        unpack_events(batch)
    except DecodeError:
        pass
import random
rng = random.Random(5)
for _ in range(3000):
    target = rng.choice(sorted(th.VALID))
    frames = [bytearray(f) for f in rng.choice(th.VALID[target])]
    frame = rng.choice(frames)
    if frame:
        frame[rng.randrange(len(frame))] ^= rng.randrange(1, 256)
    try:
        if target == "events":
            unpack_events(bytes(frames[0]))
        else:
            th.decode_message(frames)
    except DecodeError:
        pass
print("RECEIVED", received, "CALLS", calls)

# The positive control: msgpack-numpy on the same bytes does unpickle.
import msgpack, msgpack_numpy
frame = th.transport.payload(th.CORPUS["mn_kind_O_pickle"]["frames"])[0]
inner = msgpack.unpackb(msgpack.unpackb(frame)["a"].data)
fields = {b"nd": True, b"type": "|O", b"kind": b"O", b"shape": [2], b"data": inner[2]}
msgpack_numpy.decode(fields)
print("CONTROL", sorted({event for event, _ in calls}))
"""


def test_no_pickle_runs_on_received_bytes(tmp_path: Path) -> None:
    script = tmp_path / "audit.py"
    script.write_text(AUDIT_SCRIPT)
    tests = str(Path(__file__).resolve().parent)
    result = subprocess.run(
        [sys.executable, str(script), tests, str(REPO)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "RECEIVED True CALLS []" in result.stdout, result.stdout
    control = re.search(r"CONTROL (.*)", result.stdout)
    assert control, result.stdout
    assert "pickle.find_class" in control.group(1) and "pickle.loads" in control.group(1)


# -- a rogue process against a real pystream-worker -------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def zmtp_push_greeting() -> bytes:
    """A ZMTP 3.0 NULL greeting and READY command of a PUSH socket."""
    greeting = b"\xff" + b"\0" * 8 + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32
    ready = b"\x05READY\x0bSocket-Type\x00\x00\x00\x04PUSH"
    return greeting + b"\x04" + bytes([len(ready)]) + ready


def test_a_rogue_process_neither_crashes_nor_stalls_a_real_worker(tmp_path: Path) -> None:
    in_port, out_port = free_port(), free_port()
    log_path = tmp_path / "worker.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    ctx: zmq.Context[Any] = zmq.Context()
    downstream = ctx.socket(zmq.PULL)
    downstream.setsockopt(zmq.LINGER, 0)
    downstream.bind(f"tcp://127.0.0.1:{out_port}")
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [BIN / "pystream-worker", "stage", "stages:add_one",
             "--pull", f"tcp://127.0.0.1:{in_port}", "--push", f"tcp://127.0.0.1:{out_port}",
             "--max-message-bytes", "1000000"],
            stdout=out, stderr=out, env=env,
        )  # fmt: skip
    upstream = ctx.socket(zmq.PUSH)
    upstream.setsockopt(zmq.LINGER, 0)
    upstream.setsockopt(zmq.SNDTIMEO, TIMEOUT_MS)
    upstream.connect(f"tcp://127.0.0.1:{in_port}")

    def flows(x: int, via: zmq.Socket[Any] = upstream) -> None:
        via.send_multipart(good_message(x))
        while True:  # end-of-stream markers that random bytes happened to form pass on
            assert downstream.poll(10_000), log_path.read_text()
            frames = downstream.recv_multipart()
            if transport.unpack_envelope(frames[0])[0] == transport.KIND_DATA:
                break
        assert codec.decode(transport.payload(frames)) == {"x": x + 1}
        assert proc.poll() is None

    def logged(text: str) -> int:
        return log_path.read_text(errors="replace").count(text)

    def malformed_logged() -> int:
        """Lines in full, and those that summaries say were left out of a flood."""
        count = 0
        for line in log_path.read_text(errors="replace").splitlines():
            if "dropped a malformed message" in line:
                summary = re.search(r"(\(and )?(\d+) more like this in the last", line)
                left_out = int(summary.group(2)) if summary else 0
                count += left_out + (0 if summary and not summary.group(1) else 1)
        return count

    try:
        assert wait_until(lambda: "ready: input" in log_path.read_text(), 30), log_path.read_text()
        flows(0)
        # 1. Raw TCP, no ZMTP greeting at all (libzmq reads ZMTP 1.0 frames from such bytes).
        rng = np.random.default_rng(7)
        for size in (1, 10, 100, 10_000, 100_000):
            with socket.create_connection(("127.0.0.1", in_port), timeout=5) as raw:
                raw.sendall(rng.bytes(size))
        raw_text = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10
        with socket.create_connection(("127.0.0.1", in_port), timeout=5) as raw:
            raw.sendall(raw_text)
        flows(1)
        # 2. A valid ZMTP handshake, then a frame that claims 2**40 bytes: over MAXMSGSIZE.
        with socket.create_connection(("127.0.0.1", in_port), timeout=5) as raw:
            raw.sendall(zmtp_push_greeting() + b"\x02" + (2**40).to_bytes(8, "big") + b"x" * 64)
            with contextlib.suppress(OSError):
                raw.recv(64)  # its greeting, or nothing: it hangs up on us
            assert wait_until(lambda: logged("sent a frame over 1000000 bytes") >= 1, 10)
        flows(2)
        # 3. Well-formed ZeroMQ messages with garbage frames: the corpus, then random ones.
        rogue = ctx.socket(zmq.PUSH)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.setsockopt(zmq.SNDTIMEO, TIMEOUT_MS)
        rogue.connect(f"tcp://127.0.0.1:{in_port}")
        for frames in MESSAGES.values():
            rogue.send_multipart(frames)
        for _ in range(200):
            count = int(rng.integers(1, 5))
            sizes = [int(rng.integers(0, 64)) for _ in range(count)]
            sizes[0] += sizes[0] == 17  # never a well-formed envelope: each one must be refused
            rogue.send_multipart([rng.bytes(size) for size in sizes])
        expected = len(MESSAGES) + 200
        flows(3, via=rogue)  # behind the garbage on one connection: all of it was read
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log_path.read_text()
        assert logged("stopped after 4 items") == 1, log_path.read_text()
        # Raw bytes read as ZMTP 1.0 frames (step 1) make malformed messages too: at least.
        assert malformed_logged() >= expected, log_path.read_text()  # a flood, summarised
        assert logged("dropped a malformed message") < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ctx.destroy(linger=0)
        with contextlib.suppress(OSError):
            log_path.unlink()
