"""The roles of ``pystream-worker``, one per process: source, stage (or serial sub-pipeline)
and sink, wired by endpoints instead of an orchestrator.

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
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from pystream_zmq.errors import PyStreamError
from pystream_zmq.orchestrator.collector import Collector
from pystream_zmq.pacing import Pacer
from pystream_zmq.profiling import store
from pystream_zmq.stage import MAIN_PIPELINE_NAME, Leaf
from pystream_zmq.wire import codec, security, transport
from pystream_zmq.wire.outputs import Outputs
from pystream_zmq.worker.loop import Worker
from pystream_zmq.worker.spec import WorkerSpec

log = logging.getLogger(__name__)

_POLL_MS = 100  # how often a blocked send looks at the stop flag
_ACK_TIMEOUT = 1.0  # after the drain, how long to wait for the next process to leave
_END: Any = object()


@dataclass
class Stopping:
    """When to stop: ``request()`` (from the signal watcher) sets ``stop``; then the items in
    flight get up to ``drain_timeout``, and the next process up to _ACK_TIMEOUT more to
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
        return self.requested_at + self.drain_timeout + _ACK_TIMEOUT


class _Drain:
    """``done()`` for Worker.run: false until ``stop``; then true once upstream's
    end-of-stream marker has passed, or after ``drain_timeout``."""

    def __init__(self, worker: Worker, stopping: Stopping) -> None:
        self._worker = worker
        self._stopping = stopping
        self._logged = False

    def __call__(self) -> bool:
        if not self._stopping.stop.is_set():
            return False
        if not self._logged:
            self._logged = True
            log.info("stopping: draining the items in flight")
        if self._worker.upstream_done:
            return True
        if self._stopping.drain_left() <= 0:
            log.warning("no end of stream in %g s; stopping anyway", self._stopping.drain_timeout)
            return True
        return False


def _end_streams(pushes: list[zmq.Socket[Any]], deadline: float) -> None:
    """End the stream on every output (each replica downstream needs its own marker)."""
    for push in pushes:
        _end_stream(push, deadline)


def _end_stream(push: zmq.Socket[Any], deadline: float) -> None:
    """Send an end-of-stream marker and wait (until ``deadline``, a monotonic time) until
    the next process disconnects, having read it. ``push`` must have IMMEDIATE set, so that
    with nobody connected the marker cannot be sent and there is nothing to wait for."""

    def left_ms() -> int:
        return max(0, int((deadline - time.monotonic()) * 1000))

    monitor = push.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        marker = transport.pack_envelope(transport.KIND_EOS, 0, time.time())
        if not push.poll(left_ms(), zmq.POLLOUT):
            log.info("nobody downstream takes the end of stream; not waiting")
            return
        push.send(marker, zmq.NOBLOCK)
        if not monitor.poll(left_ms()):
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
        if worker.events is not None:
            worker.events.flush()
        dropped = 0 if worker.upstream_done else sum(map(_discard, worker.inputs.sockets))
        if dropped:
            log.warning("dropped %d items still queued at the input", dropped)
        _end_streams(worker.outputs.sockets, stopping.ack_deadline())
        log.info(
            "stopped after %d items (%d stage errors)",
            worker.counters["processed"],
            sum(worker.chain.errors.values()),
        )
    finally:
        security.stop_authenticator(auth)
        ctx.destroy(linger=0)


def _discard(pull: zmq.Socket[Any]) -> int:
    """Read what is queued at the input without processing it; the count of data items."""
    dropped = 0
    while True:
        try:
            frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return dropped
        dropped += frames[0].bytes[:1] == bytes([transport.KIND_DATA])


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
        if not stop.is_set():
            log.info("sent all %d items; waiting to be stopped", sent)
            stop.wait()
        _end_streams(outputs.sockets, stopping.ack_deadline())
        log.info("stopped after %d items", sent)
    finally:
        ctx.destroy(linger=0)


def iterate(produce: Callable[[], Any]) -> Iterator[Any]:
    """Items from calling ``produce()`` again and again."""
    return iter(produce, _END)  # a sentinel it never returns: call forever


# -- sink ------------------------------------------------------------------------------------
@dataclass
class ProfileTarget:
    """Where the sink records profiles: a database, the run's name and its stage names
    (levels below MainPipeline joined by '__', e.g. ``Child__StageA``)."""

    db_path: Path
    run_name: str
    stages: Sequence[str]

    def layout(self) -> list[tuple[str, str]]:
        paths = [f"{MAIN_PIPELINE_NAME}__{name}" for name in self.stages]
        return [(MAIN_PIPELINE_NAME, "pipeline")] + [
            (path, "pipeline" if any(p.startswith(path + "__") for p in paths) else "stage")
            for path in paths
        ]


def run_sink(
    pull_endpoints: list[str],
    stopping: Stopping,
    *,
    ordered: bool = True,
    profile_endpoint: str | None = None,
    profile: ProfileTarget | None = None,
    report_every: float = 2.0,
    on_latest: Callable[[Any], None] | None = None,
    hwm: int = transport.DEFAULT_HWM,
    curve: security.Curve | None = None,
) -> Any:
    """Receive outputs until stopped; log progress every ``report_every`` seconds and hand
    the latest output to ``on_latest``. Returns the latest output."""
    ctx: zmq.Context[Any] = zmq.Context()
    auth = security.start_authenticator(ctx, curve)
    writer: store.ProfileWriter | None = None
    collector: Collector | None = None
    try:
        recorder = None
        if profile is not None and profile_endpoint is not None:
            writer = store.ProfileWriter(profile.db_path)
            run_id = writer.start_run(profile.run_name, "parallel", profile.layout())
            recorder = store.RunRecorder(writer, run_id)
            log.info("profiles: run %d in %s", run_id, profile.db_path)

        def sink_counters() -> dict[str, int]:
            assert collector is not None
            counters = collector.counters()
            if writer is not None:
                counters["dropped_events"] = writer.dropped_events
            return counters

        collector = Collector(
            ctx,
            pull_endpoints,
            profile_endpoint,
            hwm,
            recorder,
            sink_counters,
            ordered=ordered,
            in_order=ordered or len(pull_endpoints) == 1,
            curve=curve,
        )
        collector.start()
        inputs = ", ".join(collector.sink_endpoints)
        profiles = collector.profile_endpoint or "off"
        log.info("ready: input %s, profiles %s%s", inputs, profiles, " (CURVE)" * bool(curve))
        progress = _Progress(collector, on_latest)
        while not stopping.stop.wait(report_every):
            progress.report()
        log.info("stopping: waiting for the items in flight")
        if not collector.wait_for_end(max(0.0, stopping.drain_left())):
            log.warning("no end of stream in %g s; stopping anyway", stopping.drain_timeout)
        progress.report()
        log.info("stopped after %d items", collector.delivered)
        return progress.latest
    finally:
        if collector is not None:
            collector.stop()
        if writer is not None:
            writer.close(timeout=_ACK_TIMEOUT)
        security.stop_authenticator(auth)
        ctx.destroy(linger=0)


class _Progress:
    def __init__(self, collector: Collector, on_latest: Callable[[Any], None] | None) -> None:
        self._collector = collector
        self._on_latest = on_latest
        self._count = 0
        self._at = time.monotonic()
        self.latest: Any = None

    def report(self) -> None:
        now, count = time.monotonic(), self._collector.delivered
        rate = (count - self._count) / max(now - self._at, 1e-9)
        log.info("%d items received, %.1f items/s", count, rate)
        self._count, self._at = count, now
        latest = self._collector.take_latest(0.0)
        if latest is not None:
            self.latest = latest
            if self._on_latest is not None:
                self._on_latest(latest)


class ImageSaver:
    """Writes the image in the latest output with cv2.imwrite, through a temporary file so
    readers never see half an image."""

    def __init__(self, path: Path, key: str | None) -> None:
        self._path = path
        self._key = key
        self._warned = False

    def __call__(self, output: Any) -> None:
        import cv2  # only the sink that saves images needs it

        image = output.get(self._key) if isinstance(output, dict) and self._key else None
        if image is None and isinstance(output, dict) and not self._key:
            image = next((v for v in output.values() if _is_image(v)), None)
        if image is None or not _is_image(image):
            if not self._warned:
                log.warning(
                    "the output holds no uint8 image to save (keys: %s)",
                    list(output) if isinstance(output, dict) else type(output).__name__,
                )
                self._warned = True
            return
        partial = self._path.with_name(f".{self._path.stem}.partial{self._path.suffix}")
        if not cv2.imwrite(str(partial), image):
            log.warning("cv2.imwrite could not write %s", partial)
            return
        os.replace(partial, self._path)


def _is_image(value: Any) -> bool:
    return (
        isinstance(value, np.ndarray)
        and value.dtype == np.uint8
        and (value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (1, 3, 4)))
    )
