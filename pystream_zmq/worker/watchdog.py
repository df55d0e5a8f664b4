"""A worker's watchdog: a thread that looks at the stage call under way
(``StageChain.current``, set before every call) while the main thread is inside it, and
says when one runs long: to the orchestrator over the status link (``wire/status.py``),
which logs it in the user's process; standalone, in the worker's own log.

It sees a stage stuck in Python code (even ``while True: pass`` lets other threads run
every few milliseconds) or in a call that releases the GIL (sleep, I/O, most of numpy). A C
call that holds the GIL for good stops this thread too: nothing is reported then.

Per call: a RUNNING notice after NOTICE_AFTER (so that stop and cleanup can name the item
if they have to wait for it), a stalled RUNNING after ``stall_after`` and again at doubling
intervals (at most _MAX_REPEAT apart), DONE when a reported call returns, and DEADLINE past
``deadline``: the orchestrator then kills the worker, which ends itself if it is not killed
within _DEADLINE_GRACE. It also sends, for the main thread (``over_memory``), MEMORY: the
worker's resident size passed its limit (worker/memory.py). And while a call runs, it sends
the batch of outputs done before it (``Sender.flush_aside``), so that they do not wait for it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from pystream_zmq import child
from pystream_zmq.plan import Limits
from pystream_zmq.stage import StageChain
from pystream_zmq.wire import security, status, transport
from pystream_zmq.worker.spec import WorkerSpec

log = logging.getLogger(__name__)

EXIT_PAST_DEADLINE = 4  # a stage call ran past its deadline and the worker ended itself
NOTICE_AFTER = 1.0  # seconds: a call running this long is reported to the orchestrator
_MAX_REPEAT = 300.0  # seconds between two stall warnings of one call, at most
_DEADLINE_GRACE = 2.0  # after DEADLINE, how long to wait to be killed before leaving
_MAX_CHECK_INTERVAL = 0.25  # seconds between two looks at the call under way
_MIN_CHECK_INTERVAL = 0.01


class Watchdog(threading.Thread):
    def __init__(
        self,
        chain: StageChain,
        spec: WorkerSpec,
        ctx: zmq.Context[Any],
        flush_batch: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(name="pystream-watchdog", daemon=True)
        self._chain = chain
        self._flush_batch = flush_batch
        self._spec = spec
        self._ctx = ctx
        # {leaf path: (stall_after, deadline)}
        self._limits = {
            path: spec.limits.get(path, Limits()).resolved()[:2] for path, _ in chain.leaves
        }
        shortest = min((min(*pair, NOTICE_AFTER) for pair in self._limits.values()), default=1.0)
        self._interval = min(max(shortest / 4, _MIN_CHECK_INTERVAL), _MAX_CHECK_INTERVAL)
        self._stopping = threading.Event()
        self._socket: zmq.Socket[Any] | None = None
        self._watched: tuple[str, int, float] | None = None  # the call looked at last
        self._reported = self._stalled = False  # what was said about it
        self._next_report = 0.0  # seconds into the call
        self._unsent: list[list[Any]] = []  # DONE and DEADLINE are sent again until they go
        self._from_main: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()  # for _unsent

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join()

    def run(self) -> None:
        if self._spec.status is not None:  # made here: a socket stays in one thread
            self._socket = transport.make_socket(self._ctx, zmq.PUSH, 1000)
            security.connect(self._socket, self._spec.status, self._spec.curve)
        try:
            while not self._stopping.wait(self._interval):
                self.check(time.time())
        finally:
            if self._socket is not None:
                self._socket.close(linger=0)

    def check(self, now: float) -> None:
        """Look at the call under way; report what is due."""
        while not self._from_main.empty():
            self._unsent.append(self._from_main.get())
        if self._socket is not None:
            self._send_unsent()
        current = self._chain.current
        if current is not self._watched:  # another call, or none: the last one returned
            if self._reported and self._watched is not None:
                self._report(status.DONE, self._watched, now, self._stalled)
            self._watched, self._reported, self._stalled = current, False, False
            self._next_report = self._first_report(current)
        if current is None:
            return
        self._flush_batch()
        path, _, start = current
        running = now - start
        stall_after, deadline = self._limits_of(path)
        if running >= deadline:
            self._past_deadline(current, now, deadline)
        elif running >= self._next_report:
            self._stalled = running >= stall_after
            self._reported = True
            self._report(status.RUNNING, current, now, self._stalled)
            self._next_report = _next_warning(running, stall_after)

    def over_memory(self, seq: int, rss: int, limit: float) -> None:
        """From the main thread: after item ``seq`` this process's resident size, ``rss``
        bytes, is over its ``limit``. Orchestrated, the report goes at the next check (this
        thread owns the socket), and the orchestrator replaces the process; standalone, it is
        logged here."""
        report = status.Report(
            self._spec.process, os.getpid(), self._spec.name, seq, float(rss), False, limit
        )
        if self._spec.status is None:
            _log_here(status.MEMORY, report)
        else:
            self._from_main.put(status.pack(status.MEMORY, report))

    def _limits_of(self, path: str) -> tuple[float, float]:
        return self._limits.get(path) or Limits().resolved()[:2]

    def _first_report(self, current: tuple[str, int, float] | None) -> float:
        if current is None:
            return 0.0
        stall_after = self._limits_of(current[0])[0]
        # Standalone, nobody would read a notice: say nothing before the stall.
        return min(NOTICE_AFTER, stall_after) if self._socket is not None else stall_after

    def _past_deadline(self, current: tuple[str, int, float], now: float, limit: float) -> None:
        self._report(status.DEADLINE, current, now, True, limit)
        # The orchestrator kills this process on DEADLINE; leaving at once could lose the
        # message (closing a sender loses what the receiver has not read yet).
        self._stopping.wait(_DEADLINE_GRACE if self._socket is not None else 0.0)
        child.leave(EXIT_PAST_DEADLINE)

    def _report(
        self,
        kind: bytes,
        current: tuple[str, int, float],
        now: float,
        stalled: bool,
        limit: float | None = None,
    ) -> None:
        path, seq, start = current
        if limit is None:
            limit = self._limits_of(path)[0]
        report = status.Report(
            self._spec.process, os.getpid(), path, seq, now - start, stalled, limit
        )
        if self._socket is None:
            _log_here(kind, report)
            return
        message = status.pack(kind, report)
        if kind == status.RUNNING:
            if self._send_unsent():  # in order: a DONE before a later call's RUNNING
                self._send(message)  # not read: the next report will do
        else:  # without them, the orchestrator would take the worker for stuck still
            self._unsent.append(message)
            self._send_unsent()

    def _send_unsent(self) -> bool:
        """Send what could not be sent before; whether all of it went."""
        while self._unsent and self._send(self._unsent[0]):
            self._unsent.pop(0)
        return not self._unsent

    def _send(self, message: list[Any]) -> bool:
        assert self._socket is not None
        try:
            self._socket.send_multipart(message, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False


def _next_warning(running: float, stall_after: float) -> float:
    """When to report the call next: at stall_after, then at doubling intervals."""
    due = stall_after
    while due <= running:
        due = min(due * 2, due + _MAX_REPEAT)
    return due


def _log_here(kind: bytes, report: status.Report) -> None:
    """Standalone (pystream-worker): the worker's own log is the user's."""
    if kind == status.RUNNING and report.stalled:
        log.warning(
            "stage %s has been running item %d for %.1f s", report.path, report.seq,
            report.running,
        )  # fmt: skip
    elif kind == status.DONE and report.stalled:
        log.warning(
            "stage %s finished item %d late, after %.1f s", report.path, report.seq,
            report.running,
        )  # fmt: skip
    elif kind == status.DEADLINE:
        log.error(
            "stage %s ran past its deadline of %g s on item %d; the worker ends",
            report.path, report.limit, report.seq,
        )  # fmt: skip
    elif kind == status.MEMORY:
        log.error(
            "%s: its resident memory, %.0f MB, passed max_memory_mb=%g after item %d; the "
            "worker ends", report.path, report.running / 2**20, report.limit / 2**20,
            report.seq,
        )  # fmt: skip
