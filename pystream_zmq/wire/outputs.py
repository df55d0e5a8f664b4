"""A sender's output sockets: one, or one per downstream replica.

An item goes to the next socket with room, round-robin: what one PUSH socket connected to
several peers does, but with a socket per replica an end-of-stream marker can be sent to
every one of them (a drain needs it to pass through each replica).

"Room" is only a hint for small items: ZeroMQ's queue of a socket fills up for a moment
(until its I/O thread has moved the messages on to the kernel) long before the replica
behind it is busy. A burst of 100 small items sent in 1.5 ms once went 98 to one replica
and 2 to the other, halving the stage's throughput. A sender that may wait therefore gives
the socket whose turn it is a few milliseconds (``wait_for_turn``) before it passes it by.
"""

from __future__ import annotations

from typing import Any

import zmq

TURN_WAIT_MS = 5  # how long the socket whose turn it is may take to have room again


class Outputs:
    def __init__(self, sockets: list[zmq.Socket[Any]]) -> None:
        self.sockets = sockets
        self._turn = 0
        self._send_timeout_ms = -1  # the SNDTIMEO of a single socket, as last set

    def send(self, frames: list[Any], timeout_ms: int, *, copy: bool = True) -> bool:
        """Send, waiting up to ``timeout_ms`` for room. A single socket waits inside
        ZeroMQ: for small items a refused send, a poll and a second send cost the
        orchestrator more than the send itself, and the queue is full half the time."""
        if len(self.sockets) > 1:
            self.wait_for_turn(min(TURN_WAIT_MS, timeout_ms))
            if self.try_send(frames, copy=copy)[0]:
                return True
            return self.wait_for_room(timeout_ms) and self.try_send(frames, copy=copy)[0]
        sock = self.sockets[0]
        if timeout_ms != self._send_timeout_ms:
            sock.setsockopt(zmq.SNDTIMEO, timeout_ms)
            self._send_timeout_ms = timeout_ms
        try:
            _send(sock, frames, 0, copy, False)
        except zmq.Again:
            return False
        return True

    def try_send(
        self, frames: list[Any], *, copy: bool = True, track: bool = False
    ) -> tuple[bool, zmq.MessageTracker | None]:
        """Send to the first socket with room, starting after the last one used; (False,
        None) when none has room."""
        count = len(self.sockets)
        for step in range(count):
            index = (self._turn + step) % count
            try:
                tracker = _send(self.sockets[index], frames, zmq.NOBLOCK, copy, track)
            except zmq.Again:
                continue
            self._turn = (index + 1) % count
            return True, tracker
        return False, None

    def wait_for_turn(self, timeout_ms: int = TURN_WAIT_MS) -> None:
        """With several sockets: wait up to ``timeout_ms`` for room in the one whose turn it
        is, so that a momentarily full queue does not send its share elsewhere."""
        if len(self.sockets) > 1 and timeout_ms > 0:
            self.sockets[self._turn].poll(timeout_ms, zmq.POLLOUT)

    def wait_for_room(self, timeout_ms: int) -> bool:
        """Whether any socket has room, waiting up to ``timeout_ms``."""
        if len(self.sockets) == 1:
            return bool(self.sockets[0].poll(timeout_ms, zmq.POLLOUT))
        poller = zmq.Poller()
        for sock in self.sockets:
            poller.register(sock, zmq.POLLOUT)
        return bool(poller.poll(timeout_ms))


def _send(
    sock: zmq.Socket[Any], frames: list[Any], flags: int, copy: bool, track: bool
) -> zmq.MessageTracker | None:
    if len(frames) == 1:  # most small items: send_multipart's checks cost more than a send
        return sock.send(frames[0], flags, copy=copy, track=track)
    return sock.send_multipart(frames, flags, copy=copy, track=track)
