"""How ``forward()`` enters the first stage: one strategy per drop policy at the source.

- "block": wait for room, up to ``input_timeout`` (not at all with ``block_input=False``);
  what does not fit by then is refused.
- "drop-newest": refuse at once when the first stage has no room.
- "latest": never refuse; the newest item waits for a feeder thread, which sends it as soon
  as there is room, and a newer item replaces (drops) one still waiting.

They all send through one ``FirstStage``: the sockets to the first stage's replicas, the
next sequence number, and the lock that a drain's end-of-stream marker takes too.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import zmq

from pystream_zmq.errors import PipelineStateError
from pystream_zmq.orchestrator.collector import Collector
from pystream_zmq.orchestrator.deadline import Deadline, in_slices
from pystream_zmq.orchestrator.supervisor import Supervisor
from pystream_zmq.wire import security, transport
from pystream_zmq.wire.outputs import Outputs

_FEED_POLL_MS = 20  # under "latest", how long the feeder waits for room before letting go

Frames = list[bytes | memoryview]


class FirstStage:
    """The orchestrator's PUSH sockets, one per replica of the first stage (connected to
    ``endpoints``). Hold ``lock`` to send, to read or advance ``next_seq``, and to close."""

    def __init__(
        self, ctx: zmq.Context[Any], endpoints: Sequence[str], hwm: int,
        curve: security.Curve | None,
    ) -> None:  # fmt: skip
        sockets = [transport.make_socket(ctx, zmq.PUSH, hwm) for _ in endpoints]
        for sock, endpoint in zip(sockets, endpoints, strict=True):
            security.connect(sock, endpoint, curve)
        self.outputs = Outputs(sockets)
        self.lock = threading.Lock()
        self.next_seq = 0  # of the next item; every one below has been sent
        self.closed = False

    @property
    def sockets(self) -> list[zmq.Socket[Any]]:
        return self.outputs.sockets

    def check_open(self) -> None:
        if self.closed:
            raise PipelineStateError("the pipeline has been cleaned up")


class Ingress:
    """What every policy shares: ``refused`` and ``replaced`` count what did not enter."""

    def __init__(self, first: FirstStage) -> None:
        self.first = first
        self.refused = 0  # items send() could not send
        self.replaced = 0  # "latest": items send() took that a newer one replaced

    def send(self, frames: Frames, sent_at: float) -> bool:
        """Hand one encoded item to the first stage; False when it was refused."""
        raise NotImplementedError

    def wait_sent(self, deadline: Deadline) -> bool:
        """Wait until every item send() took has been sent (a drain does, first)."""
        return True

    def close(self) -> None:
        """Refuse items from now on (send() raises PipelineStateError)."""
        with self.first.lock:
            self.first.closed = True


class Block(Ingress):
    """Wait up to ``timeout`` seconds for room, in slices (see deadline.in_slices)."""

    def __init__(self, first: FirstStage, timeout: float, supervisor: Supervisor) -> None:
        super().__init__(first)
        self._timeout = timeout
        self._supervisor = supervisor

    def send(self, frames: Frames, sent_at: float) -> bool:
        first = self.first
        with first.lock:
            first.check_open()
            message = transport.pack_message(transport.KIND_DATA, first.next_seq, sent_at, frames)
            # copy=True: the caller may reuse its arrays as soon as forward() returns.
            if not in_slices(
                Deadline(self._timeout),
                lambda ms: first.outputs.send(message, ms, copy=True),
                lambda: self._supervisor.failed is not None,
            ):
                self.refused += 1
                return False
            first.next_seq += 1
            return True


class DropNewest(Block):
    """Refuse at once when no replica of the first stage has room."""

    def __init__(self, first: FirstStage, supervisor: Supervisor) -> None:
        super().__init__(first, 0.0, supervisor)


class Latest(Ingress):
    """The item send() took waits for the feeder thread, replacing (and dropping) the one
    that was still waiting; send() never blocks.

    The feeder sends when the pipeline has room, which means credits: at most one item per
    worker (``window``) in flight, sent and not yet out (delivered or as a drop marker).
    ZeroMQ's queues and the kernel's socket buffers can hold thousands of small messages
    beyond the high-water mark, where no worker could see them to skip them; credits keep
    them empty. Items in flight when a worker restarts may be lost and never come out, so a
    restart gives their credits back."""

    def __init__(
        self, first: FirstStage, collector: Collector, supervisor: Supervisor, window: int
    ) -> None:
        super().__init__(first)
        self._collector = collector
        self._supervisor = supervisor
        self._window = window
        self._pending: tuple[list[bytes], float] | None = None  # (frames, sent_at)
        self._pending_cond = threading.Condition()
        self._feeder = threading.Thread(target=self._feed, name="pystream-feeder", daemon=True)
        self._feeder.start()

    def send(self, frames: Frames, sent_at: float) -> bool:
        owned = [bytes(frame) for frame in frames]  # the caller may reuse its arrays
        with self._pending_cond:
            self.first.check_open()
            if self._pending is not None:
                self.replaced += 1
            self._pending = (owned, sent_at)
            self._pending_cond.notify_all()
        return True

    def wait_sent(self, deadline: Deadline) -> bool:
        with self._pending_cond:
            while self._pending is not None and self._supervisor.failed is None:
                if not deadline.left():
                    return False
                self._pending_cond.wait(min(deadline.left(), 0.1))
            return self._pending is None

    def close(self) -> None:
        super().close()
        with self._pending_cond:
            self._pending_cond.notify_all()
        self._feeder.join()

    def _feed(self) -> None:
        first = self.first
        restarts = 0
        settled = 0  # items sent before the last restart count as out
        while True:
            with self._pending_cond:
                self._pending_cond.wait_for(lambda: self._pending is not None or first.closed)
            if sum(self._supervisor.restarts) != restarts:
                restarts, settled = sum(self._supervisor.restarts), first.next_seq
            out = max(settled, self._collector.ledger.next_seq)
            if first.next_seq - out >= self._window and not first.closed:
                self._collector.wait_for_out(
                    first.next_seq - self._window + 1, _FEED_POLL_MS / 1000
                )
                continue
            with first.lock:
                if first.closed:
                    return
                if not first.outputs.wait_for_room(_FEED_POLL_MS):
                    continue  # let drain() and close() have the lock now and then
                self._send_pending()

    def _send_pending(self) -> None:
        """Send the waiting item (the caller holds the first stage's lock and saw room)."""
        with self._pending_cond:
            item, self._pending = self._pending, None
            self._pending_cond.notify_all()
        if item is None:
            return
        frames, sent_at = item
        message = transport.pack_message(transport.KIND_DATA, self.first.next_seq, sent_at, frames)
        if not self.first.outputs.try_send(message, copy=False)[0]:
            # room went between poll and send: wait again, unless
            with self._pending_cond:  # a newer item came, which replaces this one
                if self._pending is None:
                    self._pending = item
                else:
                    self.replaced += 1
            return
        self.first.next_seq += 1


def for_policy(
    policy: str,
    first: FirstStage,
    *,
    timeout: float,
    collector: Collector,
    supervisor: Supervisor,
    window: int,
) -> Ingress:
    """The ingress of a drop policy; ``timeout``: how long "block" waits for room."""
    if policy == transport.LATEST:
        return Latest(first, collector, supervisor, window)
    if policy == transport.DROP_NEWEST:
        return DropNewest(first, supervisor)
    return Block(first, timeout, supervisor)
