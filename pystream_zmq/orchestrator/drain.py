"""Draining: delivering everything forwarded so far. An end-of-stream marker with a token of
its own goes down every replica of the first stage behind the items and follows them
through every worker, so the collector seeing it means all before it arrived; the ledger
then counts what has not come out as lost.

Its own module, not part of ingress: the marker shares the first stage's sockets and lock,
but not the policies, and it also waits at the collector and answers the supervisor's
relaunches, which no policy does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import zmq

from pystream_zmq.orchestrator.collector import Collector
from pystream_zmq.orchestrator.deadline import Deadline, in_slices
from pystream_zmq.orchestrator.ingress import FirstStage
from pystream_zmq.orchestrator.supervisor import Supervisor
from pystream_zmq.wire import transport


class Drain:
    def __init__(self, first: FirstStage, collector: Collector, supervisor: Supervisor) -> None:
        self._first = first
        self._collector = collector
        self._supervisor = supervisor
        self._last_token = 0
        self._waiting_for = 0  # the token of the drain under way, 0 when none

    def run(self, deadline: Deadline) -> bool:
        """Send the marker and wait for it; whether it came out before the deadline."""
        first = self._first
        with first.lock:
            first.check_open()
            if not in_slices(deadline, first.flush, self._failed):  # the items go first
                return False
            self._last_token += 1
            token = self._waiting_for = self._last_token
            forwarded = first.next_seq
            marker = transport.pack_envelope(transport.KIND_EOS, token, time.time())
            for sock in first.sockets:  # through every replica of the first stage
                if not in_slices(deadline, _room_in(sock), self._failed):
                    return False
                sock.send(marker, zmq.NOBLOCK)
        # In slices, so a worker that can no longer be restarted ends the wait at once.
        drained = False
        while not drained and deadline.left() and not self._failed():
            drained = self._collector.wait_for_eos(token, min(deadline.left(), 0.1))
        self._waiting_for = 0
        if drained:
            self._collector.settle(forwarded)  # what has not come out by now is lost
        return drained

    def resend(self) -> None:
        """After a relaunch: the marker may have died with the old worker."""
        first = self._first
        with first.lock:
            if self._waiting_for and not first.closed:
                marker = transport.pack_envelope(transport.KIND_EOS, self._waiting_for, time.time())
                for sock in first.sockets:
                    with contextlib.suppress(zmq.Again):
                        sock.send(marker, zmq.NOBLOCK)

    def _failed(self) -> bool:
        return self._supervisor.failed is not None


def _room_in(sock: zmq.Socket[Any]) -> Callable[[int], bool]:
    """Whether ``sock`` (to one replica of the first stage) has room, waiting up to ms."""
    return lambda ms: bool(sock.poll(ms, zmq.POLLOUT))
