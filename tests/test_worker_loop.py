"""A worker stops on time wherever its send waits (for room in a full downstream, or for
ZeroMQ to release its previous zero-copy output): on STOP when orchestrated, on done() when
standalone. A Worker runs on a thread here; its downstream is bound and never read."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import zmq
from conftest import wait_until

from pystream_zmq.wire import codec, transport
from pystream_zmq.worker.loop import Worker
from pystream_zmq.worker.spec import WorkerSpec

TIMEOUT_MS = 5000
STOP_WITHIN = 1.0  # seconds: the waits are 100 ms slices; the rest is slack for a busy machine
ITEMS = 20


def small_output(data: dict[str, Any]) -> dict[str, Any]:
    # A single frame: copied, so a send waits only for room; over the size that goes in
    # batches, so each output is a message of its own and the second one waits.
    return {"x": data["x"], "pad": bytes(8192)}


def new_array(data: dict[str, Any]) -> dict[str, Any]:
    # Over pyzmq's copy threshold, so sent zero-copy: the next item waits for its release.
    return {"a": np.zeros(1 << 20, np.uint8)}


class _Context(zmq.Context):  # type: ignore[type-arg]
    """Keeps the sockets the test makes until the end (one garbage-collected unclosed
    warns, and warnings are errors)."""

    made: list[zmq.Socket[Any]]

    def socket(self, *args: Any, **kwargs: Any) -> Any:
        sock = super().socket(*args, **kwargs)
        self.made.append(sock)
        return sock


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context = _Context()
    context.made = []
    yield context
    context.destroy(linger=0)


def start(
    ctx: zmq.Context[Any], stage: Callable[[Any], Any], *, orchestrated: bool
) -> tuple[Worker, Callable[[], None], threading.Thread]:
    """A worker with ITEMS items waiting at its input; returns it, what stops it, its thread."""
    downstream = ctx.socket(zmq.PULL)
    downstream.setsockopt(zmq.RCVHWM, 1)
    downstream.bind("inproc://loop-out")
    control = "inproc://loop-control" if orchestrated else None
    spec = WorkerSpec(
        name="W", pull="inproc://loop-in", push="inproc://loop-out", profile=None, hwm=1,
        control=control, ident=b"0",
    )  # fmt: skip
    worker = Worker(spec, [("MainPipeline__W", stage)], ctx)
    upstream = ctx.socket(zmq.PUSH)
    upstream.connect("inproc://loop-in")
    for x in range(ITEMS):
        upstream.send_multipart(
            transport.pack_message(transport.KIND_DATA, x, time.time(), codec.encode({"x": x}))
        )
    if not orchestrated:
        done = threading.Event()
        thread = threading.Thread(target=worker.run, kwargs={"done": done.is_set})
        thread.start()
        return worker, done.set, thread
    router = ctx.socket(zmq.ROUTER)
    router.bind("inproc://loop-control")
    dealer = transport.make_socket(ctx, zmq.DEALER, 1000)
    dealer.setsockopt(zmq.ROUTING_ID, b"0")
    dealer.connect("inproc://loop-control")
    dealer.send(b"hello")  # so that the ROUTER knows the route
    assert router.poll(TIMEOUT_MS)
    router.recv_multipart()
    thread = threading.Thread(target=worker.run, args=(dealer,))
    thread.start()
    # Blocked or not, the worker keeps answering its control channel.
    router.send_multipart([b"0", transport.GET_COUNTERS])
    assert router.poll(TIMEOUT_MS)
    assert router.recv_multipart()[1] == transport.COUNTERS
    return worker, lambda: router.send_multipart([b"0", transport.STOP]), thread


@pytest.mark.parametrize("orchestrated", [True, False], ids=["STOP", "done"])
@pytest.mark.parametrize("stage", [small_output, new_array], ids=["room", "release"])
def test_a_worker_waiting_to_send_stops_on_time(
    ctx: zmq.Context[Any], stage: Callable[[Any], Any], orchestrated: bool
) -> None:
    worker, stop, thread = start(ctx, stage, orchestrated=orchestrated)
    try:
        # The first output fills the unread downstream (or holds its buffer): a wait follows.
        assert wait_until(lambda: worker.counters["processed"] >= 1, 5)
        stopped_at = time.monotonic()
        stop()
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert time.monotonic() - stopped_at < STOP_WITHIN
        assert worker.counters["processed"] < ITEMS  # it was held up, not finished
    finally:
        if thread.is_alive():
            stop()
            thread.join(timeout=10)
