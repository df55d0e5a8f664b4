"""The roles of ``pystream-worker``, one per process: source, stage (or serial sub-pipeline)
and sink (sink_role.py), wired by endpoints instead of an orchestrator.

Convention: every process binds its own input and connects its output to the next one's
input, so processes start in any order and a restarted one is reconnected to by ZeroMQ.

Stopping: ``stop`` is set (by the entry point, on SIGTERM/SIGINT). The source stops and
sends an end-of-stream marker; a stage keeps working until that marker has passed through it
(or ``drain_timeout``); the sink waits for it the same way. A process then closes its output
only once the next process has gone (its disconnect is the acknowledgement that it read the
marker): closing a sender earlier can lose what the receiver had not read yet.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from pystream_zmq.errors import DecodeError, PyStreamError
from pystream_zmq.pacing import Pacer
from pystream_zmq.stage import Leaf
from pystream_zmq.wire import codec, formats, security, transport
from pystream_zmq.wire.inputs import Inputs, Message, messages_in
from pystream_zmq.wire.outputs import Outputs
from pystream_zmq.worker.loop import Worker
from pystream_zmq.worker.spec import WorkerSpec

log = logging.getLogger(__name__)

_POLL_MS = 100  # how often a blocked send looks at the stop flag
_SLICE = 0.1  # seconds: how often a wait for the next process looks at its deadline
ACK_TIMEOUT = 1.0  # after the drain, how long to wait for the next process to leave
# After a drain that timed out, how long a stage still reads (and counts as dropped) what
# upstream sends, waiting for its end of stream; the sink waits a little longer for the
# stages' last profile records (sink_role.py).
END_GRACE = 0.5
_END: Any = object()


@dataclass
class Stopping:
    """When to stop: ``request()`` (from the signal watcher) sets ``stop``; then the items in
    flight get up to ``drain_timeout``, and the next process up to ACK_TIMEOUT more to
    leave, both counted from the request."""

    stop: threading.Event = field(default_factory=threading.Event)
    drain_timeout: float = 2.5
    requested_at: float = 0.0  # time.monotonic() of the request

    def request(self) -> None:
        self.requested_at = time.monotonic()
        self.stop.set()

    def drain_left(self) -> float:
        return self.requested_at + self.drain_timeout - time.monotonic()

    def ack_deadline(self) -> float:
        """Counted from the request; from now when the stream ended without one."""
        start = self.requested_at if self.stop.is_set() else time.monotonic()
        return start + self.drain_timeout + ACK_TIMEOUT

    def deadline_once_stopped(self) -> float:
        """No deadline until a stop is requested; then ``ack_deadline()``."""
        return self.ack_deadline() if self.stop.is_set() else math.inf


class _Drain:
    """``done()`` for Worker.run: false until ``stop``; then true once upstream's
    end-of-stream marker has passed, or after ``drain_timeout``; at once if upstream is a
    program outside PyStream, which sends no such marker."""

    def __init__(self, worker: Worker, stopping: Stopping) -> None:
        self._worker = worker
        self._stopping = stopping
        self._logged = False

    def __call__(self) -> bool:
        if self._worker.upstream_done and self._worker.last_eos == transport.END_OF_DATA:
            if not self._logged:
                self._logged = True
                log.info("the input stream ended: stopping")
            return True
        if not self._stopping.stop.is_set():
            return False
        if not self._logged:
            self._logged = True
            log.info("stopping: draining the items in flight")
        if self._worker.upstream_done or self._worker.inputs.foreign:
            return True
        if self._stopping.drain_left() <= 0:
            log.warning("no end of stream in %g s; stopping anyway", self._stopping.drain_timeout)
            return True
        return False


def _end_streams(
    pushes: list[zmq.Socket[Any]], deadline: Callable[[], float], seq: int = 0
) -> None:
    """End the stream on every output (each replica downstream needs its own marker):
    ``seq`` 0 for a stop, END_OF_DATA when the source's items have all been sent."""
    for push in pushes:
        _end_stream(push, deadline, seq)


def _end_stream(push: zmq.Socket[Any], deadline: Callable[[], float], seq: int) -> None:
    """Send an end-of-stream marker and wait (until ``deadline()``, a monotonic time, looked
    at every 0.1 s) until the next process disconnects, having read it. ``push`` must have
    IMMEDIATE set, so that with nobody connected the marker cannot be sent and there is
    nothing to wait for."""

    def wait(sock: zmq.Socket[Any], flags: int) -> bool:
        while (left := deadline() - time.monotonic()) > 0:
            if sock.poll(int(min(left, _SLICE) * 1000), flags):
                return True
        return False

    monitor = push.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        marker = transport.pack_envelope(transport.KIND_EOS, seq, time.time())
        if not wait(push, zmq.POLLOUT):
            log.info("nobody downstream takes the end of stream; not waiting")
            return
        push.send(marker, zmq.NOBLOCK)
        if not wait(monitor, zmq.POLLIN):
            log.warning("the next process did not stop in time")
    finally:
        push.disable_monitor()
        monitor.close(linger=0)


# -- stage -----------------------------------------------------------------------------------
def run_worker(spec: WorkerSpec, leaves: Sequence[Leaf], stopping: Stopping) -> None:
    """Run stages between spec's pull endpoints (bound) and push endpoints (connected)
    until stopped. Raises zmq.ZMQError if an endpoint cannot be bound or connected."""
    ctx: zmq.Context[Any] = zmq.Context()
    auth = security.start_authenticator(ctx, spec.curve)
    try:
        worker = Worker(spec, list(leaves), ctx)
        inputs = ", ".join(worker.bound)
        outputs = ", ".join((spec.push, *spec.more_pushes))
        threads = f", native threads {spec.native_threads}" if spec.native_threads else ""
        curve = " (CURVE)" * bool(spec.curve)
        log.info("ready: input %s, output %s%s%s", inputs, outputs, threads, curve)
        worker.run(done=_Drain(worker, stopping))
        queued = 0
        if not worker.upstream_done:  # the drain timed out, or a foreign sender sends no end
            foreign = worker.inputs.foreign
            wait = 0.0 if foreign else stopping.drain_left() + END_GRACE
            queued = _discard_until_end(worker.inputs, wait, foreign=foreign)
        worker.counters["discarded"] += queued
        discarded = worker.counters["discarded"]
        if discarded:
            log.warning(
                "dropped %d items at the stop (%d still queued at the input, %d the next "
                "process did not take)", discarded, queued, discarded - queued,
            )  # fmt: skip
        if worker.profile is not None:
            _end_profile(worker, stopping.ack_deadline())
        if spec.output_format == formats.PYSTREAM:  # a foreign receiver knows no end of stream
            if worker.last_eos == transport.END_OF_DATA:  # pass it on, and wait as the source
                _end_streams(
                    worker.outputs.sockets, stopping.deadline_once_stopped, transport.END_OF_DATA
                )
            else:
                _end_streams(worker.outputs.sockets, stopping.ack_deadline)
        log.info(
            "stopped after %d items (%d stage errors%s)",
            worker.counters["processed"],
            sum(worker.chain.errors.values()),
            f", {discarded} dropped at the stop" if discarded else "",
        )
    finally:
        security.stop_authenticator(auth)
        ctx.destroy(linger=0)


def _end_profile(worker: Worker, deadline: float) -> None:
    """Hand the sink this worker's last records: its events, its final counters (the
    figures of its last log lines), then PROFILE_END. The sink stores what came before the
    END, and stops once every worker connected to it has sent one. Waits for room until
    ``deadline`` (monotonic): the sink may be gone."""
    assert worker.profile is not None and worker.events is not None
    worker.events.flush()
    counters = [transport.COUNTERS, *codec.encode(worker.counter_snapshot())]
    for message in (counters, [transport.PROFILE_END, worker.spec.ident]):
        left_ms = max(0, int((deadline - time.monotonic()) * 1000))
        if not worker.profile.poll(left_ms, zmq.POLLOUT):
            log.warning("the sink takes no more profile records: the last ones are lost")
            return
        worker.profile.send_multipart(message, zmq.NOBLOCK)


def _discard_until_end(inputs: Inputs, timeout: float, *, foreign: bool = False) -> int:
    """Read, without processing them, the items queued at the inputs and those upstream
    still sends, until every input has delivered its end-of-stream marker (upstream sends
    it once its own drain is over) or ``timeout`` has passed; returns how many data items
    that was (``foreign``: every message is one). So every item upstream sent is processed
    here or counted, not lost unseen."""
    deadline = time.monotonic() + timeout
    held, ended = inputs.let_go()
    dropped = sum(_kind(message) == transport.KIND_DATA for message in held)
    poller = zmq.Poller()
    for index, pull in enumerate(inputs.sockets):
        if index not in ended:
            poller.register(pull, zmq.POLLIN)
    waiting = len(inputs.sockets) - len(ended)
    while waiting:
        left_ms = int((deadline - time.monotonic()) * 1000)
        ready = dict(poller.poll(max(0, left_ms)))
        if not ready and left_ms <= 0:
            break
        for pull in ready:
            for message in messages_in(pull.recv_multipart(zmq.NOBLOCK, copy=False)):
                kind = _kind(message)
                dropped += foreign or kind == transport.KIND_DATA
                if kind == transport.KIND_EOS:
                    poller.unregister(pull)
                    waiting -= 1
    return dropped


def _kind(message: Message) -> int | None:
    try:
        return transport.unpack_envelope(message[0])[0]
    except DecodeError:
        return None  # not counted: it was no item


# -- source ----------------------------------------------------------------------------------
def run_source(
    items: Iterator[Any],
    push_endpoints: list[str],
    stopping: Stopping,
    *,
    period: float,
    count: int | None,
    hwm: int = transport.DEFAULT_HWM,
    curve: security.Curve | None = None,
) -> None:
    """Send ``items`` every ``period`` seconds (at most ``count``), then wait for stop;
    several ``push_endpoints``: one per replica of the first stage."""
    ctx: zmq.Context[Any] = zmq.Context()
    stop = stopping.stop
    try:
        outputs = Outputs([transport.make_socket(ctx, zmq.PUSH, hwm) for _ in push_endpoints])
        for push, endpoint in zip(outputs.sockets, push_endpoints, strict=True):
            push.setsockopt(zmq.IMMEDIATE, 1)
            security.connect(push, endpoint, curve)
        secured = " (CURVE)" * bool(curve)
        log.info(
            "ready: output %s, one item every %g s%s", ", ".join(push_endpoints), period, secured
        )
        sent = 0
        pacer = Pacer(period)
        while not stop.is_set() and (count is None or sent < count):
            item = next(items, _END)
            if item is _END:
                break
            try:
                payload = codec.encode(item)
            except PyStreamError as e:  # refused here rather than by the next process
                log.error("an item from the source cannot be sent; skipped: %s", e)
                continue
            frames = transport.pack_message(transport.KIND_DATA, sent, time.time(), payload)
            delivered = False
            while not stop.is_set() and not (delivered := outputs.try_send(frames)[0]):
                outputs.wait_for_room(_POLL_MS)  # downstream full or absent: wait, see a stop
            if not delivered:
                break
            sent += 1  # even if the stop came just after: it went out
            if pacer.wait(stop):
                break
        if stop.is_set():
            _end_streams(outputs.sockets, stopping.ack_deadline)
        else:  # the end of the data: it goes through the chain, which ends by itself
            log.info("sent all %d items; the end of the stream goes downstream", sent)
            _end_streams(outputs.sockets, stopping.deadline_once_stopped, transport.END_OF_DATA)
        log.info("stopped after %d items", sent)
    finally:
        ctx.destroy(linger=0)


def iterate(produce: Callable[[], Any]) -> Iterator[Any]:
    """Items from calling ``produce()`` again and again."""
    return iter(produce, _END)  # a sentinel it never returns: call forever
