"""The control channel: the orchestrator's ROUTER socket, to which every worker's DEALER
connects. Workers say READY (or FAILED) at start; the orchestrator asks them all for their
state, counters or stop (``transport``'s vocabulary) and collects one reply from each.

Nothing a peer says about itself is trusted. ZeroMQ gives each connection a routing id of
its own (workers choose none, and without ROUTER_HANDOVER a peer that claims an id in use is
refused), and that id stands for a worker only once its READY (or FAILED) showed the
token the launcher gave that worker process over its private stdin pipe; each token is
good for one READY. Messages from any other peer are counted (``rogue``) and ignored. Every
command carries a request id that the reply echoes, so a late reply to an earlier command
(one that timed out) is never taken as the answer to the next.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from pystream_zmq.errors import DecodeError
from pystream_zmq.orchestrator.deadline import Deadline
from pystream_zmq.profiling.receiver import is_counters
from pystream_zmq.throttle import Throttled
from pystream_zmq.wire import codec, transport

log = logging.getLogger(__name__)

_ANNOUNCEMENTS = (transport.READY, transport.FAILED)  # [kind, token, ...]: unasked


class Control:
    """``alive()`` gives the indices of the workers that can answer (they said READY and
    still run). ``ask_all`` may be called from several threads: one exchange at a time."""

    def __init__(
        self, ctx: zmq.Context[Any], names: Sequence[str], alive: Callable[[], list[int]]
    ) -> None:
        self.socket = transport.make_socket(ctx, zmq.ROUTER, 1000)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._names = list(names)
        self._alive = alive
        self._lock = threading.Lock()  # the socket: one exchange at a time
        self._peers = threading.Lock()  # the maps below (the supervisor admits workers)
        self._tokens: dict[bytes, int] = {}  # token a started process will show -> index
        self._spent: set[bytes] = set()  # tokens of processes since replaced
        self._routes: dict[int, bytes] = {}  # index -> routing id, once its token was shown
        self._workers: dict[bytes, int] = {}  # the reverse
        self._retired: set[bytes] = set()  # routing ids of processes since replaced
        self._request = 0
        self.rogue = 0  # messages from peers that are not our workers, ignored
        self._warn_rogue = Throttled(
            log,
            logging.WARNING,
            "ignored a control message from unknown peer %r (%d so far): only this "
            "pipeline's workers may use its control channel",
        )

    def admit(self, index: int) -> bytes:
        """A fresh token for a process about to be started as worker ``index``: its READY
        must show it. The process it replaces (if any) is no longer listened to."""
        token = secrets.token_bytes(16)
        with self._peers:
            for old in [t for t, i in self._tokens.items() if i == index]:
                del self._tokens[old]
                self._spent.add(old)
            self._tokens[token] = index
            route = self._routes.pop(index, None)
            if route is not None:
                del self._workers[route]
                self._retired.add(route)
        return token

    def next_message(self, timeout_ms: int) -> tuple[int, list[bytes]] | None:
        """(worker index, message) of the next message from one of our workers, READY and
        FAILED without their token; None when none came within ``timeout_ms``, or it came
        from someone else."""
        with self._lock:
            if not self.socket.poll(timeout_ms):
                return None
            return self._from_worker(self.socket.recv_multipart())

    def ask_all(self, command: bytes, timeout: float) -> dict[int, list[bytes]]:
        """Send a command to every live worker and collect one reply from each (without
        its request id), waiting up to ``timeout`` from when the channel is ours."""
        with self._lock:
            deadline = Deadline(timeout)
            self._take_waiting()
            self._request += 1
            request = self._request.to_bytes(8, "little")
            waiting = set()
            for index in self._alive():
                route = self._route(index)
                if route is None:  # restarting: not ready yet
                    continue
                try:
                    self.socket.send_multipart([route, command, request])
                except zmq.ZMQError:  # gone (ROUTER_MANDATORY): nothing to ask
                    continue
                waiting.add(index)
            replies: dict[int, list[bytes]] = {}
            while waiting and self.socket.poll(deadline.left_ms()):
                found = self._from_worker(self.socket.recv_multipart())
                if found is None:
                    continue
                index, (kind, *rest) = found
                if kind in _ANNOUNCEMENTS:  # a restarted worker announcing itself
                    continue
                if index not in waiting or rest[:1] != [request]:
                    log.debug("dropped a late %r reply of %s", kind[:16], self._names[index])
                    continue
                replies[index] = [kind, *rest[1:]]
                waiting.discard(index)
        for index in waiting:
            log.warning("worker %s did not answer %r in time", self._names[index], command)
        return replies

    def _take_waiting(self) -> None:
        """Read what came since the last exchange: a restarted worker's READY is read only
        by an exchange, and one that awaits no other reply (a pipeline of one worker) would
        never read it, so that worker would never be asked anything."""
        while self.socket.poll(0):
            found = self._from_worker(self.socket.recv_multipart())
            if found is not None and found[1][0] not in _ANNOUNCEMENTS:
                log.debug("dropped a late %r reply of %s", found[1][0][:16], self._names[found[0]])

    def _route(self, index: int) -> bytes | None:
        with self._peers:
            return self._routes.get(index)

    def _from_worker(self, message: list[bytes]) -> tuple[int, list[bytes]] | None:
        """(worker index, message) from a control message; None when it is not from one of
        our workers (counted and logged, unless it is from one since replaced)."""
        route, *reply = message
        with self._peers:
            index = self._workers.get(route)
            if index is not None:
                return (index, reply) if reply else None
            late = route in self._retired
            if index is None and len(reply) >= 2 and reply[0] in _ANNOUNCEMENTS:
                token = reply[1]
                late = late or token in self._spent
                index = self._tokens.pop(token, None)
                if index is not None:
                    self._routes[index] = route
                    self._workers[route] = index
                    return index, [reply[0], *reply[2:]]
        if late:  # e.g. a READY nobody read before its process died
            log.debug("dropped a control message of a worker since restarted")
        else:
            self._ignore(route)
        return None

    def _ignore(self, route: bytes) -> None:
        self.rogue += 1
        self._warn_rogue(route[:16], self.rogue)


def decode_counters(reply: list[bytes], kind: bytes) -> dict[str, dict[str, int]] | None:
    """The counters a worker sent in a reply of ``kind``; None when it is not one."""
    if not reply or reply[0] != kind:
        return None
    try:
        counters = codec.decode(reply[1:])
    except DecodeError:
        return None
    return counters if is_counters(counters) else None
