"""A sender's output sockets: one, or one per downstream replica.

An item goes to the next socket with room, round-robin: what one PUSH socket connected to
several peers does, but with a socket per replica an end-of-stream marker can be sent to
every one of them (a drain needs it to pass through each replica).
"""

from __future__ import annotations

from typing import Any

import zmq


class Outputs:
    def __init__(self, sockets: list[zmq.Socket[Any]]) -> None:
        self.sockets = sockets
        self._turn = 0

    def try_send(
        self, frames: list[Any], *, copy: bool = True, track: bool = False
    ) -> tuple[bool, zmq.MessageTracker | None]:
        """Send to the first socket with room, starting after the last one used; (False,
        None) when none has room."""
        count = len(self.sockets)
        for step in range(count):
            index = (self._turn + step) % count
            try:
                tracker = self.sockets[index].send_multipart(
                    frames, zmq.NOBLOCK, copy=copy, track=track
                )
            except zmq.Again:
                continue
            self._turn = (index + 1) % count
            return True, tracker
        return False, None

    def wait_for_room(self, timeout_ms: int) -> bool:
        """Whether any socket has room, waiting up to ``timeout_ms``."""
        if len(self.sockets) == 1:
            return bool(self.sockets[0].poll(timeout_ms, zmq.POLLOUT))
        poller = zmq.Poller()
        for sock in self.sockets:
            poller.register(sock, zmq.POLLOUT)
        return bool(poller.poll(timeout_ms))
