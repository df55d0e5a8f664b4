"""The profile writer in a process of its own, so that unpacking event batches and storing
rows in SQLite do not take CPU time and the GIL from the orchestrator.

The process binds one PULL socket. The workers' profile sockets connect to it, and so does
the orchestrator's handle (``writer_handle.ProfileProcess``), which sends its own
MainPipeline events and counters the same way ([EVENTS, packed], [COUNTERS, codec frames]),
followed, when asked, by a request [FLUSH, msgpack [token, what, ends, events, timeout]].
Messages from one sender arrive in order, so a request follows everything the orchestrator
sent before it. The process reads them with a receiver.ProfileReceiver and keeps the
requests to itself: it waits until it has seen ``ends`` PROFILE_END markers and accounted
for ``events`` events in all (the senders report how many they sent), or the timeout; then,
as ``what`` says, flushes or closes its ProfileWriter, and answers [FLUSHED, msgpack [token,
written, dropped, ends, lost]] on a PUSH socket of its own that connects back to the
orchestrator.

A writer that replaces one that died (``WriterSpec.restarts`` > 0) counts what its
predecessors stored as accounted for; what they had received but not stored is lost, and
the counts cannot tell it from what is still on its way. So a restarted writer also answers
once every sender has connected and nothing has arrived for ``SETTLE`` seconds, and records
the difference as ``profile_events_lost`` (and its restart count) under MainPipeline.

Like a worker, the process exits when its stdin reaches EOF before it was told to close (the
orchestrator has gone away), and after a close it waits for stdin to close before exiting so
the answer is not lost with its socket.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from pystream_zmq import child
from pystream_zmq.profiling import store
from pystream_zmq.profiling.receiver import ProfileReceiver
from pystream_zmq.stage import MAIN_PIPELINE_NAME
from pystream_zmq.wire import transport

log = logging.getLogger(__name__)

FLUSH = b"flush"
FLUSHED = b"flushed"
RECEIVE, STORE, CLOSE = 0, 1, 2  # what a request waits for: ends, + stored, + closed
HWM = 1000  # messages queued towards the process; beyond it batches are dropped, counted
SETTLE = 0.3  # a restarted writer: this long without a message means nothing more is coming
_EXIT_GRACE = 10.0  # after a close, how long to wait for stdin to close before exiting anyway
_IDLE_POLL_MS = 1000

Request = tuple[int, int, int, int, float]  # token, what, ends, events, timeout


@dataclasses.dataclass(frozen=True)
class WriterSpec:
    """What one writer process is given on its command line."""

    db_path: Path
    run_id: int
    endpoint: str  # where it binds its PULL socket
    reply_endpoint: str  # where it connects its answers
    senders: int  # processes whose profile sockets connect: the workers and the orchestrator
    restarts: int = 0  # writers of this run that died before this one
    dropped_before: int = 0  # events those writers dropped, as of their last answer
    log_level: int = logging.WARNING

    def to_args(self) -> list[str]:
        return [str(getattr(self, f.name)) for f in dataclasses.fields(self)]

    @classmethod
    def from_args(cls, args: list[str]) -> WriterSpec:
        db_path, run_id, endpoint, reply, senders, restarts, dropped, level = args
        return cls(
            Path(db_path), int(run_id), endpoint, reply, int(senders), int(restarts),
            int(dropped), int(level),
        )  # fmt: skip


def parse_request(packed: bytes) -> Request | None:
    try:
        token, what, ends, events, timeout = msgpack.unpackb(packed)
        return int(token), int(what), int(ends), int(events), float(timeout)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        log.warning("dropped a malformed flush request: %s", e)
        return None


class _Server:
    """One writer process's sockets, its receiver and the request it is working on."""

    def __init__(self, ctx: zmq.Context[Any], spec: WriterSpec, writer: store.ProfileWriter):
        self._spec = spec
        self._writer = writer
        # What the writers before this one stored is accounted for; counted before this one
        # stores anything.
        self._stored_before = store.count_events(spec.db_path, spec.run_id) if spec.restarts else 0
        self._pull = transport.make_socket(ctx, zmq.PULL, HWM)
        self._poller = zmq.Poller()
        self._poller.register(self._pull, zmq.POLLIN)
        self._monitor: zmq.Socket[Any] | None = None
        if spec.restarts:  # set up before binding, so that no connection goes uncounted
            self._monitor = self._pull.get_monitor_socket(
                zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
            )
            self._poller.register(self._monitor, zmq.POLLIN)
        self._pull.bind(spec.endpoint)
        self._reply = transport.make_socket(ctx, zmq.PUSH, 10)
        self._reply.connect(spec.reply_endpoint)
        self._recorder = store.RunRecorder(writer, spec.run_id, dropped_before=spec.dropped_before)
        self._receiver = ProfileReceiver(self._recorder)
        self._connected = 0  # senders connected now (counted only by a restarted writer)
        self._lost = 0  # events found lost when this writer last settled
        self._last_message = time.monotonic()
        self._request: Request | None = None
        self._deadline = 0.0

    def run(self, finished: threading.Event) -> None:
        """Store what arrives until a request asks to close (then set ``finished``)."""
        self._writer.start()
        if self._spec.restarts:  # the run is marked as soon as this writer can store it
            restarts = {store.WRITER_RESTARTS: self._spec.restarts}
            self._recorder.counters({MAIN_PIPELINE_NAME: restarts})
        while True:
            for sock, _ in self._poller.poll(self._wait_ms()):
                if sock is self._pull:
                    self._take(self._pull.recv_multipart())
                else:
                    self._count_connection(sock)
            if self._request is not None and self._answerable() and self._answer(finished):
                return

    @property
    def _accounted(self) -> int:
        """Events this run's writers received: stored or dropped by those before this one,
        and every one this one received."""
        return self._stored_before + self._spec.dropped_before + self._receiver.events

    def _take(self, message: list[bytes]) -> None:
        self._last_message = time.monotonic()
        if message[0] == FLUSH and len(message) == 2:
            asked = parse_request(message[1])
            if asked is not None:  # a newer request replaces one its sender gave up on
                self._request, self._deadline = asked, time.monotonic() + asked[4]
        else:
            self._receiver.take(message)

    def _count_connection(self, monitor: zmq.Socket[Any]) -> None:
        event = recv_monitor_message(monitor)["event"]
        self._connected += 1 if event == zmq.EVENT_ACCEPTED else -1

    def _count_met(self) -> bool:
        """Whether the request's counts arrived; what was found lost counts as arrived, so
        that a restarted writer settles once for each loss, not at every request."""
        assert self._request is not None
        _, _, ends, events, _ = self._request
        return self._receiver.ends >= ends and self._accounted + self._lost >= events

    def _settle_at(self) -> float | None:
        """When a restarted writer may take everything to have arrived: SETTLE after the
        last message, once every sender is connected; None if not yet known."""
        if not self._spec.restarts or self._connected < self._spec.senders:
            return None
        return self._last_message + SETTLE

    def _wait_ms(self) -> int:
        if self._request is None:
            return _IDLE_POLL_MS
        until = self._deadline
        settle = self._settle_at()
        if settle is not None:
            until = min(until, settle)
        return max(0, int((until - time.monotonic()) * 1000) + 1)

    def _answerable(self) -> bool:
        assert self._request is not None
        now = time.monotonic()
        if now >= self._deadline or self._request[1] == CLOSE or self._count_met():
            return True
        settle = self._settle_at()
        return settle is not None and now >= settle

    def _answer(self, finished: threading.Event) -> bool:
        """Flush or close as asked, then answer; whether the writer closed."""
        assert self._request is not None
        token, what, _, events, _ = self._request
        # Only then is a shortfall known to be lost rather than still on its way: at a close,
        # and when a restarted writer settled. A settle is a guess (SETTLE of quiet): records
        # that come after it were late, not lost, and the next answer counts them back.
        settled = what == CLOSE or (
            self._spec.restarts > 0 and (not self._count_met() or self._lost > 0)
        )
        if settled and events:
            self._lost = max(0, events - self._accounted)
            if self._lost or self._spec.restarts:
                self._recorder.counters({MAIN_PIPELINE_NAME: {store.EVENTS_LOST: self._lost}})
        left = max(0.0, self._deadline - time.monotonic())
        if what == CLOSE:
            self._writer.close(left)
        elif what == STORE:
            self._writer.flush(left)
        answer = [
            token,
            self._stored_before + self._writer.written_events,
            self._spec.dropped_before + self._writer.dropped_events,
            self._receiver.ends,
            self._lost,
        ]
        if what == CLOSE:
            finished.set()  # before the answer: the orchestrator closes stdin on it
        self._reply.send_multipart([FLUSHED, msgpack.packb(answer)])
        self._request = None
        return what == CLOSE


def serve(spec: WriterSpec, finished: threading.Event) -> None:
    """Run one writer until a request asks it to close. Its sockets stay open until the
    process exits: closing them could lose the last answer."""
    ctx: zmq.Context[Any] = zmq.Context()
    writer = store.ProfileWriter(spec.db_path)
    try:
        _Server(ctx, spec, writer).run(finished)
    finally:
        writer.close(1.0)


def main() -> None:
    spec = WriterSpec.from_args(sys.argv[1:])
    logging.basicConfig(level=spec.log_level, format=child.log_format("profile writer"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator decides, as for workers
    # The lowest CPU priority: on a busy machine storing rows waits for idle time instead of
    # taking it from the pipeline; its queues are bounded (see ProfileWriter and the
    # workers' NOBLOCK sends), and what overflows is dropped and counted.
    os.nice(19)
    parent = child.ParentWatch()
    code = 0
    try:
        serve(spec, parent.finished)
        parent.stdin_closed.wait(_EXIT_GRACE)
    except Exception:
        log.exception("the profile writer failed")
        code = 1
    child.leave(code)
