"""A worker's send side: getting an item's frames downstream while the worker stays
responsive. With replicas downstream each one takes its turn; a full downstream is waited
for; arrays go out zero-copy and are tracked until ZeroMQ lets go of them, because a stage
may write into the buffer it returned on its next call.

Every wait is cut into slices of _POLL_MS, and ``between_waits`` runs after each: the worker
answers its control channel there, and raises to abandon the send when it must stop.

Quick small items are sent in batches (``defer``, then ``flush``; wire/batch.py). A batch
is sent when it is due at the next item, before the worker waits for input, and, should a
stage call run long, by the watchdog's thread (``flush_aside``): what is done goes on while
a stage hangs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from pystream_zmq.wire.batch import Batch
from pystream_zmq.wire.outputs import Outputs

_POLL_MS = 100  # how long a wait lasts before ``between_waits`` runs


class Sender:
    def __init__(self, outputs: Outputs, between_waits: Callable[[], None]) -> None:
        self.outputs = outputs
        # A socket whose input also ends a wait slice early: the control channel, if any.
        self.wake_on: zmq.Socket[Any] | None = None
        self._between_waits = between_waits
        self._tracker: zmq.MessageTracker | None = None
        self._poller: zmq.Poller | None = None  # made on the first full downstream
        self.batch = Batch()  # deferred one-frame messages, in order
        # Held by whoever uses the sockets: the worker's thread, or flush_aside's.
        self._lock = threading.Lock()

    def defer(self, frame: bytes) -> None:
        """Send a one-frame message with the next ones, in a batch: once it is due at the
        next ``defer``, at ``flush`` or another send."""
        with self._lock:
            self.batch.add(frame)
            if self.batch.due():
                self._flush()

    def flush(self) -> None:
        """Send what ``defer`` holds."""
        if len(self.batch):
            with self._lock:
                self._flush()

    def flush_aside(self) -> None:
        """From another thread, while the worker's is inside a stage call: send what
        ``defer`` holds if there is room now; nothing if the worker's thread is sending."""
        if not len(self.batch) or not self._lock.acquire(blocking=False):
            return
        try:
            if len(self.batch) and self.outputs.try_send([self.batch.frame()])[0]:
                self.batch.sent()
        finally:
            self._lock.release()

    def abandon(self) -> int:
        """Forget what ``defer`` holds (the worker stops); how many messages that was."""
        with self._lock:
            return self.batch.clear()

    def _flush(self) -> None:
        if len(self.batch):
            self._send_to(self.outputs, [self.batch.frame()])
            self.batch.sent()

    def send(self, frames: list[Any], everywhere: bool = False, tracked: bool = True) -> None:
        """Send to the next replica downstream with room (``everywhere``: to each one),
        after what ``defer`` holds. ``tracked=False``: the buffers are received frames
        passed on as they are, so there is no release to wait for."""
        with self._lock:
            self._flush()
            if everywhere and len(self.outputs.sockets) > 1:
                for sock in self.outputs.sockets:
                    self._send_to(Outputs([sock]), frames)
            else:
                self._send_to(self.outputs, frames, tracked)

    def wait_for_release(self) -> None:
        """Wait until ZeroMQ has let go of the previous zero-copy output, so that the stage
        may write into that buffer again."""
        while self._tracker is not None:
            try:
                self._tracker.wait(_POLL_MS / 1000)
                self._tracker = None
            except zmq.NotDone:
                self._between_waits()

    def _send_to(self, outputs: Outputs, frames: list[Any], tracked: bool = True) -> None:
        zero_copy = len(frames) > 1  # out-of-band arrays follow envelope and header
        track = zero_copy and tracked
        outputs.wait_for_turn()  # with replicas downstream: keep their shares even
        while True:
            sent, tracker = outputs.try_send(frames, copy=not zero_copy, track=track)
            if sent:
                if track:
                    self._tracker = tracker
                return
            self._poller_for(outputs).poll(_POLL_MS)
            self._between_waits()

    def _poller_for(self, outputs: Outputs) -> zmq.Poller:
        """Wakes on room in ``outputs`` or input on ``wake_on``; the one for all outputs
        is kept, since a full downstream tends to stay full."""
        if outputs is self.outputs and self._poller is not None:
            return self._poller
        poller = zmq.Poller()
        for sock in outputs.sockets:
            poller.register(sock, zmq.POLLOUT)
        if self.wake_on is not None:
            poller.register(self.wake_on, zmq.POLLIN)
        if outputs is self.outputs:
            self._poller = poller
        return poller


def share_received_frames(message: list[Any], received: list[zmq.Frame]) -> bool:
    """Whether every out-of-band buffer of ``message`` is the whole of a frame received
    with the item (a stage passed its array on, perhaps changed in place); if so, those
    frames replace the buffers. ZeroMQ then shares each frame's memory with the next
    process: no copy, and no wait for a release before the next item, which a buffer the
    stage made itself needs, since the stage may write into it again."""
    frames_at = {_address(frame.buffer): frame for frame in received[1:]}
    passed = []
    for buffer in message[1:]:
        frame = frames_at.get(_address(buffer))
        if frame is None or len(frame) != memoryview(buffer).nbytes:
            return False
        passed.append(frame)
    message[1:] = passed
    return True


def _address(buffer: Any) -> int:
    return int(np.frombuffer(buffer, np.uint8).__array_interface__["data"][0])
