"""How ``forward()`` enters the first stage: one strategy per drop policy at the source.

- "block": wait for room, up to ``input_timeout`` (not at all with ``block_input=False``);
  what does not fit by then is refused.
- "drop-newest": refuse at once when the first stage has no room.
- "latest": never refuse; the newest item waits for a feeder thread, which sends it as soon
  as there is room, and a newer item replaces (drops) one still waiting.

"Room" means a free credit as well as room in a socket: ZeroMQ's queues and the kernel's
socket buffers hold thousands of small messages past the high-water mark, so what is in
flight (sent, and not yet out of the pipeline: delivered, dropped or counted lost) is
counted here, by sequence number (``Credits``).

They all send through one ``FirstStage``: the sockets to the first stage's replicas, the
next sequence number, and the lock that a drain's end-of-stream marker takes too.

Under "block", small items go in batches while the pipeline is moving fast (transport.
KIND_BATCH): each ZeroMQ message costs this process, the worker and both I/O threads more
than a small item's own work. The first item of a batch waits at most ``batch.WAIT``
(wire/batch.py): the next ``forward()`` sends it when it is due, or the batch's own thread
does.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any

import zmq

from pystream_zmq.errors import PipelineStateError
from pystream_zmq.orchestrator.collector import Collector
from pystream_zmq.orchestrator.deadline import Deadline, in_slices
from pystream_zmq.orchestrator.supervisor import Supervisor
from pystream_zmq.wire import batch, security, transport
from pystream_zmq.wire.outputs import Outputs

_FEED_POLL_MS = 20  # under "latest", how long the feeder waits for room before letting go
# Batches only while items come out at least this fast (under 200 us each): slower, a
# message per item costs little next to their work, and replicas share items more evenly.
BATCH_RATE = 5000
BATCH_GAP = 0.0002  # ... and only an item that follows the one before this closely
_BATCH_RETRY_MS = 10  # how long the batch's thread waits for room in one go

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
        self.endpoints = list(endpoints)
        self._curve = curve
        self.outputs = Outputs(sockets)
        self.lock = threading.Lock()
        self.next_seq = 0  # of the next item; every one below has been sent or batched
        self.closed = False
        self.batch = batch.Batch()  # one-frame messages, to go as one
        self._batch_started = threading.Condition(self.lock)
        self._flusher: threading.Thread | None = None

    @property
    def sockets(self) -> list[zmq.Socket[Any]]:
        return self.outputs.sockets

    def relink(self, position: int, endpoint: str) -> None:
        """Connect the socket to the ``position``-th replica at ``endpoint`` instead: that
        worker was restarted on another cluster node. What was queued for the old address
        is lost, and counted so by the ledger, as with any restart."""
        with self.lock:
            sock = self.sockets[position]
            with contextlib.suppress(zmq.ZMQError):  # not connected any more
                sock.disconnect(self.endpoints[position])
            security.connect(sock, endpoint, self._curve)
            self.endpoints[position] = endpoint

    def check_open(self) -> None:
        if self.closed:
            raise PipelineStateError("the pipeline has been cleaned up")

    def close(self) -> None:
        """Refuse items from now on; a batch not sent by now is let go."""
        with self.lock:
            self.closed = True
            self._batch_started.notify()
        if self._flusher is not None:
            self._flusher.join()

    # -- the batch: hold the lock --------------------------------------------------------
    def add_to_batch(self, frame: bytes) -> None:
        """Send ``frame`` (a one-frame message) with the next ones; ``batch.due()`` says
        when to ``flush`` first."""
        if not len(self.batch):
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._flush_when_due, name="pystream-batches", daemon=True
                )
                self._flusher.start()
            self._batch_started.notify()
        self.batch.add(frame)

    def flush(self, timeout_ms: int) -> bool:
        """Send the batch, waiting up to ``timeout_ms`` for room; whether it went (or
        there was none)."""
        if not len(self.batch):
            return True
        if not self.outputs.send([self.batch.frame()], timeout_ms):
            return False
        self.batch.sent()
        return True

    def _flush_when_due(self) -> None:
        with self.lock:
            while not self.closed:
                if not len(self.batch):
                    self._batch_started.wait()
                elif (left := self.batch.left()) > 0:
                    self._batch_started.wait(left)
                elif not self.flush(_BATCH_RETRY_MS):
                    self._batch_started.wait(batch.WAIT)  # let forward() and drain() in


class Credits:
    """Items in flight: sent, and not yet out (``Collector.out()``: delivered, and read by
    a ``results()`` reader if there is one, dropped or counted lost). At most
    ``window``, which lies between ``floor`` and ``cap``: above the floor only while items
    come out fast enough that a fuller window holds no more than QUEUE_TIME of the
    pipeline's work. A stage of 0.3 s per item keeps the floor; small items through quick
    stages, which a small window would slow to half their rate (a wake-up every few items
    in every process), get up to ``cap``.

    Items in flight when a worker restarts may be lost and come out only as a gap once a
    later item does, so a restart gives their credits back."""

    QUEUE_TIME = 0.03  # seconds of work that may wait in the queues, above the floor
    # Seconds between measurements of the rate items come out: as soon as a window's worth
    # has come out (a 300-frame run of 1 MB frames lasts 75 ms: most of it was spent at
    # the floor waiting for the first 50 ms measurement), else at most this long.
    _MEASURE_SOON = 0.005
    _MEASURE_EVERY = 0.05

    def __init__(
        self,
        first: FirstStage,
        collector: Collector,
        supervisor: Supervisor,
        floor: int,
        cap: int,
    ) -> None:
        self.cap = cap
        self.window = self._floor = min(floor, cap)
        self._first = first
        self._collector = collector
        self._supervisor = supervisor
        self._restarts = 0
        self._settled = 0  # items sent before the last restart count as out
        self._out = 0  # every item below is out; read from the ledger only when it matters
        self._measured = (time.monotonic(), 0)  # (when, self._out then)
        self.rate = 0.0  # items out per second, as last measured

    def fast(self) -> bool:
        """Whether items came out quickly enough, when last measured, that a ZeroMQ
        message per item costs much next to their own work (see ``FirstStage.batch``)."""
        return self.rate >= BATCH_RATE

    def free(self) -> bool:
        """Whether a credit is free, without waiting: the fast path, a subtraction while
        the window is far from full."""
        return self._first.next_seq - self._out < self.window or self.in_flight() < self.window

    def in_flight(self) -> int:
        if self._first.next_seq - self._out >= self.window:
            restarts = self._supervisor.restarts_in_all
            if restarts != self._restarts:
                self._restarts, self._settled = restarts, self._first.next_seq
            self._out = max(self._settled, self._collector.out())
            self._resize()
        return self._first.next_seq - self._out

    def _resize(self) -> None:
        now = time.monotonic()
        then, out_then = self._measured
        elapsed = now - then
        if elapsed >= self._MEASURE_EVERY or (
            elapsed >= self._MEASURE_SOON and self._out - out_then >= self.window
        ):
            rate = self.rate = (self._out - out_then) / (now - then)
            self.window = min(self.cap, max(self._floor, int(rate * self.QUEUE_TIME)))
            self._measured = (now, self._out)

    def wait(self, timeout_ms: int) -> bool:
        """Whether a credit is free, waiting up to ``timeout_ms`` for one. Once the window
        is full it waits for half of it to come back (or the timeout), not for one credit:
        fewer wake-ups for a fast pipeline of small items."""
        if self.in_flight() < self.window:
            return True
        half_out = self._first.next_seq - self.window // 2
        self._collector.wait_for_out(half_out, timeout_ms / 1000)
        return self.in_flight() < self.window


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
        self.first.close()


class Block(Ingress):
    """Wait up to ``timeout`` seconds for a credit and room, in slices (see
    deadline.in_slices)."""

    _batches = True  # small items go in batches while the pipeline moves fast

    def __init__(
        self, first: FirstStage, timeout: float, supervisor: Supervisor, credits: Credits
    ) -> None:
        super().__init__(first)
        self._timeout = timeout
        self._supervisor = supervisor
        self._credits = credits
        self._last_item = 0.0  # when send() was called last (time.monotonic())

    def send(self, frames: Frames, sent_at: float) -> bool:
        first = self.first
        with first.lock:
            first.check_open()
            deadline = Deadline(self._timeout)
            message = transport.pack_message(transport.KIND_DATA, first.next_seq, sent_at, frames)
            credits = self._credits
            now = time.monotonic()
            follows, self._last_item = now - self._last_item < BATCH_GAP, now
            if (
                self._batches
                and follows
                and batch.fits(message)
                and credits.fast()
                and credits.free()
            ):
                if first.batch.due() and not self._flush(deadline):
                    self.refused += 1
                    return False
                first.add_to_batch(message[0])
                first.next_seq += 1
                return True
            # copy=True: the caller may reuse its arrays as soon as forward() returns.
            if not (
                self._flush(deadline)
                and (credits.free() or in_slices(deadline, credits.wait, self._failed))
                and in_slices(
                    deadline, lambda ms: first.outputs.send(message, ms, copy=True), self._failed
                )
            ):
                self.refused += 1
                return False
            first.next_seq += 1
            return True

    def wait_sent(self, deadline: Deadline) -> bool:
        with self.first.lock:
            return self._flush(deadline)

    def _flush(self, deadline: Deadline) -> bool:
        return in_slices(deadline, self.first.flush, self._failed)

    def _failed(self) -> bool:
        return self._supervisor.failed is not None


class DropNewest(Block):
    """Refuse at once when no credit is free or no replica of the first stage has room."""

    _batches = False  # a batch would hold items past the room the policy looks at

    def __init__(self, first: FirstStage, supervisor: Supervisor, credits: Credits) -> None:
        super().__init__(first, 0.0, supervisor, credits)


class Latest(Ingress):
    """The item send() took waits for the feeder thread, replacing (and dropping) the one
    that was still waiting; send() never blocks.

    The feeder sends when a credit is free; its window is one item per worker, so that no
    item waits in a queue where no worker could see it to skip it."""

    def __init__(self, first: FirstStage, supervisor: Supervisor, credits: Credits) -> None:
        super().__init__(first)
        self._supervisor = supervisor
        self._credits = credits
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
        while True:
            with self._pending_cond:
                self._pending_cond.wait_for(lambda: self._pending is not None or first.closed)
            if not first.closed and not self._credits.wait(_FEED_POLL_MS):
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
    floor: int,
    cap: int,
) -> Ingress:
    """The ingress of a drop policy; ``timeout``: how long "block" waits for room;
    ``floor`` and ``cap``: the bounds of the credit window (see Credits)."""
    credits = Credits(first, collector, supervisor, floor, cap)
    if policy == transport.LATEST:
        return Latest(first, supervisor, credits)
    if policy == transport.DROP_NEWEST:
        return DropNewest(first, supervisor, credits)
    return Block(first, timeout, supervisor, credits)
