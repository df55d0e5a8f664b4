"""The control channel: the orchestrator's ROUTER socket, to which every worker's DEALER
connects with its process index as routing id. Workers say READY (or FAILED) at start;
the orchestrator asks them all for their state, counters or stop (``transport``'s
vocabulary) and collects one reply from each.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from pystream_zmq.errors import DecodeError
from pystream_zmq.orchestrator.deadline import Deadline
from pystream_zmq.profiling.receiver import is_counters
from pystream_zmq.wire import codec, transport

log = logging.getLogger(__name__)


class Control:
    """``alive()`` gives the indices of the workers that can answer (they said READY and
    still run). ``ask_all`` may be called from several threads: one exchange at a time."""

    def __init__(
        self, ctx: zmq.Context[Any], names: Sequence[str], alive: Callable[[], list[int]]
    ) -> None:
        self.socket = transport.make_socket(ctx, zmq.ROUTER, 1000)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes its id over
        self._names = list(names)
        self._alive = alive
        self._lock = threading.Lock()  # the socket: one exchange at a time

    def next_message(self, timeout_ms: int) -> tuple[int, list[bytes]] | None:
        """(worker index, message) of the next message from one of our workers; None when
        none came within ``timeout_ms``, or it came from someone else."""
        with self._lock:
            if not self.socket.poll(timeout_ms):
                return None
            return self._from_worker(self.socket.recv_multipart())

    def ask_all(self, command: bytes, timeout: float) -> dict[int, list[bytes]]:
        """Send a command to every live worker and collect one reply from each, waiting up
        to ``timeout`` from when the channel is ours."""
        with self._lock:
            deadline = Deadline(timeout)
            waiting = set(self._alive())
            for index in list(waiting):
                try:
                    self.socket.send_multipart([str(index).encode(), command])
                except zmq.ZMQError:  # never connected (ROUTER_MANDATORY): nothing to ask
                    waiting.discard(index)
            replies: dict[int, list[bytes]] = {}
            while waiting and self.socket.poll(deadline.left_ms()):
                found = self._from_worker(self.socket.recv_multipart())
                if found is None:
                    continue
                index, reply = found
                if reply[:1] == [transport.READY]:  # a restarted worker announcing itself
                    continue
                replies[index] = reply
                waiting.discard(index)
        for index in waiting:
            log.warning("worker %s did not answer %r in time", self._names[index], command)
        return replies

    def _from_worker(self, message: list[bytes]) -> tuple[int, list[bytes]] | None:
        """(worker index, reply) from a control message; None, logged, when it is not from
        one of our workers (only they should reach this private endpoint)."""
        ident, *reply = message
        index = int(ident) if ident.isdigit() and len(ident) < 8 else -1
        if not reply or not 0 <= index < len(self._names):
            # A READY nobody read before its worker died: the restarted worker took the
            # routing id over (ROUTER_HANDOVER), and ZeroMQ renamed the dead connection.
            if reply[:1] != [transport.READY]:
                log.warning("ignored a control message from unknown peer %r", ident[:16])
            return None
        return index, reply


def decode_counters(reply: list[bytes], kind: bytes) -> dict[str, dict[str, int]] | None:
    """The counters a worker sent in a reply of ``kind``; None when it is not one."""
    if not reply or reply[0] != kind:
        return None
    try:
        counters = codec.decode(reply[1:])
    except DecodeError:
        return None
    return counters if is_counters(counters) else None
