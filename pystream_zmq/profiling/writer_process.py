"""The profile writer in a process of its own, so that unpacking event batches and storing
rows in SQLite do not take CPU time and the GIL from the orchestrator.

The process binds one PULL socket. The workers' profile sockets connect to it, and so does
the orchestrator's ProfileProcess, which sends its own MainPipeline events and counters the
same way ([EVENTS, packed], [COUNTERS, codec frames]), followed, when asked, by a flush
request [FLUSH, msgpack [token, ends, events, timeout, what]]. Messages from one sender
arrive in order, so a request follows everything the orchestrator sent before it. The
process reads them with a receiver.ProfileReceiver, and keeps the flush requests to
itself: it waits until it has seen ``ends`` PROFILE_END markers and ``events`` events in all
(the workers report with their state how many they sent), or the timeout; then, as ``what``
says, flushes or closes its ProfileWriter, and answers [FLUSHED, msgpack [token, written,
dropped, ends]] on a PUSH socket of its own that connects back to the orchestrator.

Like a worker, the process exits when its stdin reaches EOF before it was told to close (the
orchestrator has gone away), and after a close it waits for stdin to close before exiting so
the answer is not lost with its socket.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import msgpack
import zmq

from pystream_zmq import child
from pystream_zmq.errors import WorkerStartupError
from pystream_zmq.profiling import store
from pystream_zmq.profiling.events import pack_events
from pystream_zmq.profiling.receiver import ProfileReceiver
from pystream_zmq.stage import Event
from pystream_zmq.wire import codec, transport

log = logging.getLogger(__name__)

FLUSH = b"flush"
FLUSHED = b"flushed"
_RECEIVE, _FLUSH, _CLOSE = 0, 1, 2  # what a flush request waits for: ends, + stored, + closed
_HWM = 1000  # messages queued towards the process; beyond it batches are dropped, counted
_EXIT_GRACE = 10.0  # after a close, how long to wait for stdin to close before exiting anyway


def _stop_if_mine(proc: subprocess.Popen[bytes], owner: int) -> None:
    """The finalizer: stop the process, unless this is a child forked from its owner."""
    if os.getpid() == owner:
        child.stop([proc], 1.0)


class ProfileProcess:
    """The orchestrator's side: starts the process, hands it events and counters without
    ever blocking (what does not fit is dropped and counted), flushes and closes it.
    ``events`` and ``counters`` may be called from one thread (the collector) while another
    calls ``flush``; ``close`` and ``kill`` are idempotent."""

    def __init__(
        self, ctx: zmq.Context[Any], db_path: Path, run_id: int, endpoint: str,
        reply_endpoint: str,
    ) -> None:  # fmt: skip
        self.endpoint = endpoint
        self._reply = transport.make_socket(ctx, zmq.PULL, 10)
        self._reply.bind(reply_endpoint)
        self._push = transport.make_socket(ctx, zmq.PUSH, _HWM)
        self._push.connect(endpoint)
        self._lock = threading.Lock()  # the PUSH socket
        self._flush_lock = threading.Lock()  # the reply socket and the token
        self._token = 0
        self._sent = 0  # events handed to the PUSH socket
        self._local_dropped = 0  # events that did not fit in the queue to the process
        self._remote: tuple[int, int] = (0, 0)  # written, dropped, as of the last answer
        self._closed = False
        args = [str(db_path), str(run_id), endpoint, reply_endpoint]
        level = str(logging.getLogger("pystream_zmq").getEffectiveLevel())
        self._proc = child.start(__name__, *args, level)
        self._finalizer = weakref.finalize(self, _stop_if_mine, self._proc, os.getpid())

    def wait_ready(self, timeout: float) -> None:
        """The readiness handshake (a flush), separate so that it overlaps the workers'
        start-up; WorkerStartupError if the process does not answer in time."""
        if self.flush(timeout) is None:
            self.kill()
            raise WorkerStartupError("profile writer", "did not answer in time")

    @property
    def dropped_events(self) -> int:
        """Events that did not fit in the queue to the process. The process adds its own
        store's drops to MainPipeline's counters (see receiver.ProfileReceiver)."""
        return self._local_dropped

    @property
    def written_events(self) -> int:
        return self._remote[0]

    def events(self, events: list[Event]) -> bool:
        message = [transport.EVENTS, pack_events(events)]
        with self._lock:
            if not self._closed:
                try:
                    self._push.send_multipart(message, zmq.NOBLOCK)
                    self._sent += len(events)
                    return True
                except zmq.Again:
                    pass
            self._local_dropped += len(events)
            return False

    def counters(self, counters: store.Counters) -> bool:
        """Send a snapshot; the process adds its store's drops to MainPipeline's
        dropped_events."""
        message = [transport.COUNTERS, *codec.encode(dict(counters))]
        with self._lock:
            if self._closed:
                return False
            try:
                self._push.send_multipart(message, zmq.NOBLOCK)
                return True
            except zmq.Again:
                return False

    def flush(self, timeout: float = 5.0, worker_events: int = 0) -> int | None:
        """Wait until everything sent so far, and ``worker_events`` events from workers, are
        stored (or dropped); the number of PROFILE_END markers seen, None on timeout."""
        return self._ask(timeout, 0, _FLUSH, self._sent + worker_events)

    def wait_for_ends(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` PROFILE_END markers arrived (those workers' events too)."""
        return self._ask(timeout, count, _RECEIVE) is not None

    def close(self, timeout: float = 5.0) -> None:
        """Flush, then let the process exit; kill it if it does not within ``timeout``."""
        deadline = time.monotonic() + timeout
        if not self._closed:
            if self._ask(timeout, 0, _CLOSE) is None:
                log.warning("the profile writer did not finish in %.1f s", timeout)
            with self._lock:
                self._closed = True
        self._finalizer.detach()
        child.stop([self._proc], max(0.0, deadline - time.monotonic()))
        self._push.close(linger=0)
        self._reply.close(linger=0)
        dropped = self._local_dropped + self._remote[1]
        if dropped:
            log.warning("%d profile events were dropped (the database was too slow)", dropped)

    def kill(self) -> None:
        with self._lock:
            self._closed = True
        self._finalizer.detach()
        child.stop([self._proc], 0.0)
        self._push.close(linger=0)
        self._reply.close(linger=0)

    def _ask(self, timeout: float, ends: int, what: int, events: int = 0) -> int | None:
        deadline = time.monotonic() + timeout
        with self._flush_lock:
            self._token += 1
            # the process gets 90 % of the time, so that its answer arrives in time
            request = [FLUSH, msgpack.packb([self._token, ends, events, timeout * 0.9, what])]
            with self._lock:
                if self._closed:
                    return None
                # blocks only while the process is behind by _HWM messages
                self._push.setsockopt(zmq.SNDTIMEO, max(0, int(timeout * 1000)))
                try:
                    self._push.send_multipart(request)
                except zmq.Again:
                    return None
            while (left := deadline - time.monotonic()) > 0:
                if not self._reply.poll(int(left * 1000) + 1):
                    break
                try:
                    token, written, dropped, seen = msgpack.unpackb(self._reply.recv_multipart()[1])
                except (ValueError, IndexError, msgpack.UnpackException):
                    continue
                if token == self._token:
                    self._remote = (written, dropped)
                    return int(seen)
            return None


# -- the process -----------------------------------------------------------------------------
_Request = tuple[int, int, int, float, int]  # token, ends, events, timeout, what


def _flush_request(packed: bytes) -> _Request | None:
    try:
        token, ends, events, timeout, what = msgpack.unpackb(packed)
        return int(token), int(ends), int(events), float(timeout), int(what)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        log.warning("dropped a malformed flush request: %s", e)
        return None


def serve(
    db_path: Path, run_id: int, endpoint: str, reply_endpoint: str, finished: threading.Event
) -> None:
    """Store what arrives until a flush request asks to close (then set ``finished``)."""
    ctx: zmq.Context[Any] = zmq.Context()
    writer = store.ProfileWriter(db_path)
    try:
        pull = transport.make_socket(ctx, zmq.PULL, _HWM)
        pull.bind(endpoint)
        reply = transport.make_socket(ctx, zmq.PUSH, 10)
        reply.connect(reply_endpoint)
        writer.start()
        receiver = ProfileReceiver(store.RunRecorder(writer, run_id))
        request: _Request | None = None
        deadline = 0.0
        while True:
            wait = 1000 if request is None else max(0, int((deadline - time.monotonic()) * 1000))
            if pull.poll(wait):
                message = pull.recv_multipart()
                if message[0] == FLUSH and len(message) == 2:
                    asked = _flush_request(message[1])
                    if asked is not None:
                        request, deadline = asked, time.monotonic() + asked[3]
                else:
                    receiver.take(message)
            if request is None:
                continue
            token, ends, events, _, what = request
            if (receiver.ends < ends or receiver.events < events) and time.monotonic() < deadline:
                continue
            close = what == _CLOSE
            left = max(0.0, deadline - time.monotonic())
            if close:
                writer.close(left)
            elif what == _FLUSH:
                writer.flush(left)
            answer = [token, writer.written_events, writer.dropped_events, receiver.ends]
            if close:
                finished.set()  # before the answer: the orchestrator closes stdin on it
            reply.send_multipart([FLUSHED, msgpack.packb(answer)])
            request = None
            if close:
                return
    finally:
        writer.close(1.0)


def main() -> None:
    db_path, run_id, endpoint, reply_endpoint, level = sys.argv[1:]
    logging.basicConfig(level=int(level), format=child.log_format("profile writer"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the orchestrator decides, as for workers
    # The lowest CPU priority: on a busy machine storing rows waits for idle time instead of
    # taking it from the pipeline; its queues are bounded (see ProfileWriter and the
    # workers' NOBLOCK sends), and what overflows is dropped and counted.
    os.nice(19)
    parent = child.ParentWatch()
    code = 0
    try:
        serve(Path(db_path), int(run_id), endpoint, reply_endpoint, parent.finished)
        parent.stdin_closed.wait(_EXIT_GRACE)
    except Exception:
        log.exception("the profile writer failed")
        code = 1
    child.leave(code)
