"""The orchestrator's handle on its profile writer process (``writer_process``): starts it,
hands it MainPipeline's events and counters without ever blocking, flushes and closes it,
and keeps it alive.

The writer is supervised like a worker: ``check()`` (the supervisor calls it every 0.1 s,
and every request calls it first) starts a new one, for the same run and database, when
the process has died, up to ``max_restarts`` times. What the dead one had received but not
stored is lost; the new one counts it (``profile_events_lost``) and records its restart
(``profile_writer_restarts``) under MainPipeline. Past the restarts, the run is marked
``profile_writer_failed`` in the database directly, records from then on are dropped and
counted, and every request returns at once. A request never waits on a dead process: it
notices the death within 0.1 s and asks the new one, within its own timeout.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import subprocess
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
from pystream_zmq.profiling.writer_process import CLOSE, FLUSH, HWM, RECEIVE, STORE, WriterSpec
from pystream_zmq.stage import MAIN_PIPELINE_NAME, Event
from pystream_zmq.wire import codec, transport

log = logging.getLogger(__name__)

_SLICE = 0.1  # seconds: how soon a request notices that the process died
_DIED = -1  # what _await_answer returns when the process it asked has died


def _stop_if_mine(procs: list[subprocess.Popen[bytes]], owner: int) -> None:
    """The finalizer: stop the writer, unless this is a child forked from its owner."""
    if os.getpid() == owner:
        child.stop(procs, 1.0)


class ProfileProcess:
    """See the module docstring. ``events`` and ``counters`` may be called from one thread
    (the collector) while another calls ``flush`` and a third ``check``; ``close`` and
    ``kill`` are idempotent."""

    def __init__(
        self, ctx: zmq.Context[Any], db_path: Path, run_id: int, endpoint: str,
        reply_endpoint: str, *, senders: int = 1, max_restarts: int = 3,
    ) -> None:  # fmt: skip
        """``senders``: the processes whose profile sockets connect to the writer (the
        workers and this one)."""
        self.endpoint = endpoint
        level = logging.getLogger("pystream_zmq").getEffectiveLevel()
        self._spec = WriterSpec(db_path, run_id, endpoint, reply_endpoint, senders, 0, 0, level)
        self._max_restarts = max_restarts
        self._reply = transport.make_socket(ctx, zmq.PULL, 10)
        self._reply.bind(reply_endpoint)
        self._push = transport.make_socket(ctx, zmq.PUSH, HWM)
        self._push.connect(endpoint)
        self._lock = threading.Lock()  # the PUSH socket
        self._flush_lock = threading.Lock()  # the reply socket and the token
        self._life_lock = threading.Lock()  # the process: check() and its restarts
        self._token = 0
        self._sent = 0  # events handed to the PUSH socket
        self._local_dropped = 0  # events that did not fit in the queue to the process
        self._remote: tuple[int, int] = (0, 0)  # written, dropped, as of the last answer
        self.lost_events = 0  # lost with writers that died, as of the last answer
        self.restarts = 0
        self.failed = False  # the writer died past its restarts: nothing is stored any more
        self._last_counters: dict[str, dict[str, int]] = {}  # while failed, for close()
        self._closed = False
        self._procs = [self._spawn()]  # one; a list, so the finalizer stops the current one
        self._finalizer = weakref.finalize(self, _stop_if_mine, self._procs, os.getpid())

    def _spawn(self) -> subprocess.Popen[bytes]:
        spec = dataclasses.replace(
            self._spec, restarts=self.restarts, dropped_before=self._remote[1]
        )
        return child.start("pystream_zmq.profiling.writer_process", *spec.to_args())

    def wait_ready(self, timeout: float) -> None:
        """The readiness handshake (a flush), separate so that it overlaps the workers'
        start-up; WorkerStartupError if the process exits or does not answer in time."""
        if self.flush(timeout, restart=False) is None:
            code = self._procs[0].poll()
            self.kill()
            detail = "did not answer in time" if code is None else f"exited with code {code}"
            raise WorkerStartupError("profile writer", detail)

    @property
    def dropped_events(self) -> int:
        """Events that did not fit in the queue to the process (the process adds its own
        store's drops to MainPipeline's counters; see receiver.ProfileReceiver), and, once
        no writer is left, those its writers dropped too."""
        return self._local_dropped + (self._remote[1] if self.failed else 0)

    def events(self, events: list[Event]) -> bool:
        message = [transport.EVENTS, pack_events(events)]
        with self._lock:
            if not self._closed and not self.failed:
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
        dropped_events. Once no writer is left, the last one is kept for close()."""
        if self.failed:
            for path, values in counters.items():
                self._last_counters.setdefault(path, {}).update(values)
            return False
        message = [transport.COUNTERS, *codec.encode(dict(counters))]
        with self._lock:
            if self._closed:
                return False
            try:
                self._push.send_multipart(message, zmq.NOBLOCK)
                return True
            except zmq.Again:
                return False

    # -- supervision -----------------------------------------------------------------------
    def check(self) -> bool:
        """Start a new writer if the process died (see the module docstring); whether one is
        running. Never raises: the supervisor's thread calls it."""
        with self._life_lock:
            if self._closed or self.failed:
                return False
            code = self._procs[0].poll()
            if code is None:
                return True
            if self.restarts >= self._max_restarts:
                self._give_up(code)
                return False
            self.restarts += 1
            log.error(
                "the profile writer (pid %d) died with exit code %d; restart %d of %d (the "
                "records it had not stored are lost, and counted)",
                self._procs[0].pid, code, self.restarts, self._max_restarts,
            )  # fmt: skip
            child.stop(self._procs, 0.0)  # reaped already: this closes its stdin pipe
            try:
                self._procs[0] = self._spawn()
            except OSError:  # e.g. no more processes: the next check counts another death
                log.exception("could not start a profile writer")
            return True

    def _give_up(self, code: int) -> None:
        self.failed = True
        log.error(
            "the profile writer died with exit code %d after %d restarts; profile records "
            "are dropped from now on and the run is marked incomplete",
            code, self.restarts,
        )  # fmt: skip
        self._mark({})

    def _mark(self, counters: store.Counters) -> None:
        """Record ``counters`` and that the run has no writer any more, in the database
        directly."""
        main = {store.WRITER_RESTARTS: self.restarts, store.WRITER_FAILED: 1}
        marked = {**counters, MAIN_PIPELINE_NAME: {**counters.get(MAIN_PIPELINE_NAME, {}), **main}}
        try:
            store.record_counters(self._spec.db_path, self._spec.run_id, marked)
        except sqlite3.Error as e:
            log.error("could not mark the profile run as incomplete: %s", e)

    # -- requests ----------------------------------------------------------------------------
    def flush(
        self, timeout: float = 5.0, worker_events: int = 0, *, restart: bool = True
    ) -> int | None:
        """Wait until everything sent so far, and ``worker_events`` events from workers, are
        stored (or dropped); the number of PROFILE_END markers seen, None on timeout or when
        there is no writer (``restart=False``: when the first one died)."""
        return self._ask(timeout, STORE, events=self._sent + worker_events, restart=restart)

    def wait_for_ends(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` PROFILE_END markers arrived (those workers' events too)."""
        return self._ask(timeout, RECEIVE, ends=count) is not None

    def close(self, timeout: float = 5.0, worker_events: int = 0) -> None:
        """Store what was sent, and let the process exit; kill it if it does not within
        ``timeout``. ``worker_events``: how many events the workers reported sending, so
        that the writer can count what never arrived."""
        deadline = time.monotonic() + timeout
        if not self._closed:
            if self.failed:
                self._mark(self._last_counters)
            elif self._ask(timeout, CLOSE, events=self._sent + worker_events) is None:
                log.warning("the profile writer did not finish in %.1f s", timeout)
            with self._lock, self._life_lock:
                self._closed = True
        self._finalizer.detach()
        child.stop(self._procs, max(0.0, deadline - time.monotonic()))
        self._push.close(linger=0)
        self._reply.close(linger=0)
        dropped = self._local_dropped + self._remote[1]
        if dropped:
            log.warning("%d profile events were dropped (the database was too slow)", dropped)
        if self.lost_events:
            log.warning("%d profile events were lost with a profile writer that died",
                        self.lost_events)  # fmt: skip

    def kill(self) -> None:
        with self._lock, self._life_lock:
            self._closed = True
        self._finalizer.detach()
        child.stop(self._procs, 0.0)
        self._push.close(linger=0)
        self._reply.close(linger=0)

    def _ask(
        self, timeout: float, what: int, *, ends: int = 0, events: int = 0, restart: bool = True
    ) -> int | None:
        """Send a request and wait for its answer; if the process dies meanwhile, ask the
        one that replaces it, within the same ``timeout``."""
        end = time.monotonic() + timeout
        with self._flush_lock:
            while (left := end - time.monotonic()) > 0:
                if not (self.check() if restart else self._procs[0].poll() is None):
                    return None
                proc = self._procs[0]
                self._token += 1
                # the process gets 90 % of the time, so that its answer arrives in time
                request = [FLUSH, msgpack.packb([self._token, what, ends, events, left * 0.9])]
                if not self._send(request, proc, end):
                    continue
                seen = self._await_answer(proc, end)
                if seen != _DIED:
                    return seen
            return None

    def _send(self, request: list[bytes], proc: subprocess.Popen[bytes], end: float) -> bool:
        """Queue ``request`` for ``proc``: at once unless the queue is full (the process is
        behind by HWM messages), never holding the socket for long, so the collector's
        events go on; False if the process died or the time is up."""
        while True:
            with self._lock:
                if self._closed:
                    return False
                wait_ms = int(min(_SLICE, max(0.0, end - time.monotonic())) * 1000)
                if self._push.poll(wait_ms, zmq.POLLOUT):
                    try:
                        self._push.send_multipart(request, zmq.NOBLOCK)
                        return True
                    except zmq.Again:
                        pass
            if time.monotonic() >= end or not self._alive(proc):
                return False

    def _await_answer(self, proc: subprocess.Popen[bytes], end: float) -> int | None:
        """The answer to the latest token: the PROFILE_END markers seen; None at ``end``,
        _DIED as soon as ``proc`` has died or been replaced."""
        while (left := end - time.monotonic()) > 0:
            if not self._reply.poll(int(min(left, _SLICE) * 1000) + 1):
                if not self._alive(proc):
                    return _DIED
                continue
            try:
                token, written, dropped, seen, lost = msgpack.unpackb(
                    self._reply.recv_multipart()[1]
                )
            except (ValueError, IndexError, TypeError, msgpack.UnpackException):
                continue
            if token == self._token:
                self._remote, self.lost_events = (int(written), int(dropped)), int(lost)
                return int(seen)
        return None

    def _alive(self, proc: subprocess.Popen[bytes]) -> bool:
        return proc.poll() is None and proc is self._procs[0]
