"""A receiver's input sockets: one, or one per upstream replica.

Several inputs are merged. An end-of-stream marker is passed on once every input has
delivered it (each upstream replica sends its own, after its items). With ``ordered``, items
come out in sequence order: each input holds at most one item (its head), and the head with
the next sequence number goes first. Each replica's output is in order, so once every input
holds a later item, the missing one can never come (it was lost with a crashed replica): it
is skipped and counted. When the inputs go quiet right after such a loss, the wait is
bounded by ``reorder_timeout``.

A batch (transport.KIND_BATCH) is taken apart here: what comes out is one message per item.

With ``foreign``, the senders are programs outside PyStream (wire/formats.py): a message
has no envelope, so it gets one when it is read, with the next of this receiver's own
sequence numbers; there is no end-of-stream marker, and nothing to order by.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import zmq

from pystream_zmq.errors import DecodeError
from pystream_zmq.wire import transport

log = logging.getLogger(__name__)

Message = list[Any]  # [envelope + header, *buffers] (transport.py), as zmq.Frame or bytes

REORDER_TIMEOUT = 10.0  # seconds a later item waits for a missing one before it is skipped
_EOS_KEY = math.inf  # an end-of-stream head sorts after every item
_ITEMS_PER_COUNT = 16  # of a batch's items, how many count as one message in a burst


class Inputs:
    def __init__(
        self,
        sockets: list[zmq.Socket[Any]],
        *,
        ordered: bool = False,
        burst: int = 64,
        reorder_timeout: float = REORDER_TIMEOUT,
        first_seq: int | None = 0,
        foreign: bool = False,
    ) -> None:
        self.sockets = sockets
        self.foreign = foreign
        self._numbered = 0  # foreign: messages given a sequence number so far
        self.ordered = ordered and len(sockets) > 1 and not foreign
        self._burst = burst
        self._reorder_timeout = reorder_timeout
        self._eos_from: dict[int, set[int]] = {}  # token -> inputs that delivered it
        # ordered only: each input's head (key, message); the next sequence number expected
        # (None for a restarted receiver that joins mid-stream, until its first item).
        self._heads: list[tuple[float, Message] | None] = [None] * len(sockets)
        # ordered only: the rest of each input's last batch, to become its heads in turn
        self._batched: list[collections.deque[Message]] = [collections.deque() for _ in sockets]
        self._next_seq = first_seq
        self._waiting_since: float | None = None  # a head waits for a missing item
        self._in_hand = 0  # messages take() has received and not yielded yet
        self.skipped = 0  # items that never reached this merge (lost upstream)
        self.late = 0  # items that came after they had been skipped: discarded

    def wanted(self) -> list[zmq.Socket[Any]]:
        """The sockets to poll for input: under ``ordered``, those without a head."""
        if not self.ordered:
            return self.sockets
        return [sock for sock, head in zip(self.sockets, self._heads, strict=True) if head is None]

    def poll_ms(self, default: int) -> int:
        """How long the caller may sleep in poll before ``take`` must look at the timeout."""
        if self._waiting_since is None:
            return default
        left = self._waiting_since + self._reorder_timeout - time.monotonic()
        return max(0, min(default, int(left * 1000) + 1))

    def take(self, ready: Iterable[zmq.Socket[Any]]) -> Iterator[Message]:
        """The messages to handle now, in order, from the sockets that polled ready. Not
        ordered, each is received only when the caller asks for it, so one that stops early
        leaves the rest queued in ZeroMQ (where backpressure and accounting see them)."""
        ready = set(ready)
        if not self.ordered:
            for index, sock in enumerate(self.sockets):
                if sock in ready:
                    yield from self._read_burst(index)
            return
        out: list[Message] = []
        for index, sock in enumerate(self.sockets):
            if sock in ready and self._heads[index] is None:
                self._read_head(index, out)
        self._release(out)
        while self._refill_heads(out):  # from batches received already
            self._release(out)
        yield from self._handing(out)

    def more_waiting(self) -> bool:
        """Whether another message is here already: received with the one being handled
        (a batch), or waiting in a socket's queue."""
        if self._in_hand or any(self._batched):
            return True
        return any(int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN for sock in self.sockets)

    def _handing(self, messages: list[Message]) -> Iterator[Message]:
        for count, message in enumerate(messages, 1):
            self._in_hand = len(messages) - count
            yield message
        self._in_hand = 0

    def let_go(self) -> tuple[list[Message], set[int]]:
        """For a receiver that stops before the end of stream: the messages held here
        (ordered: each input's head), taken out, and the indexes of the inputs whose
        end-of-stream marker has arrived already."""
        ended = {index for seen in self._eos_from.values() for index in seen}
        held = []
        for index, head in enumerate(self._heads):
            if head is not None:
                if head[0] == _EOS_KEY:
                    ended.add(index)
                else:
                    held.append(self._pop(index))
        for batched in self._batched:
            held += batched
            batched.clear()
        return held, ended

    # -- not ordered ---------------------------------------------------------------------
    def _read_burst(self, index: int) -> Iterator[Message]:
        """At most ``burst`` messages, a batch counting as one per _ITEMS_PER_COUNT of its
        items as well: a receiver gets back to its other sockets within ~1,000 items."""
        sock = self.sockets[index]
        taken = 0
        while taken < self._burst:
            try:
                message = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            taken += 1
            if self.foreign:
                envelope = transport.pack_envelope(transport.KIND_DATA, self._numbered, time.time())
                self._numbered += 1
                yield [envelope, *message]
            elif transport.is_batch(message):
                batch = [one for one in _unbatch(message) if self._passes(one, index)]
                taken += len(batch) // _ITEMS_PER_COUNT
                yield from self._handing(batch)
            elif self._passes(message, index):
                yield message

    def _passes(self, message: Message, index: int) -> bool:
        """False for an end-of-stream marker that other inputs have still to deliver."""
        if len(self.sockets) == 1:
            return True
        kind, token = _peek(message)
        if kind != transport.KIND_EOS:
            return True
        seen = self._eos_from.setdefault(token, set())
        seen.add(index)
        if len(seen) < len(self.sockets):
            return False
        del self._eos_from[token]
        return True

    # -- ordered -------------------------------------------------------------------------
    def _read_head(self, index: int, out: list[Message]) -> None:
        try:
            message = self.sockets[index].recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        if transport.is_batch(message):
            self._batched[index].extend(_unbatch(message))
            self._refill_head(index, out)
            return
        self._set_head(index, message, out)

    def _refill_heads(self, out: list[Message]) -> bool:
        """Give each input without a head the next message of its batch; whether any got one."""
        refilled = False
        for index, head in enumerate(self._heads):
            if head is None and self._batched[index]:
                self._refill_head(index, out)
                refilled = True
        return refilled

    def _refill_head(self, index: int, out: list[Message]) -> None:
        batched = self._batched[index]
        while batched and self._heads[index] is None:
            self._set_head(index, batched.popleft(), out)

    def _set_head(self, index: int, message: Message, out: list[Message]) -> None:
        kind, seq = _peek(message)
        if kind is None:
            out.append(message)  # malformed: the handler counts and logs it
        elif kind == transport.KIND_EOS:
            self._heads[index] = (_EOS_KEY, message)
        elif self._next_seq is not None and seq < self._next_seq:
            self.late += 1  # the sink has counted it lost already
            log.warning("item %d came after it had been skipped; discarded", seq)
        else:
            self._heads[index] = (seq, message)

    def _release(self, out: list[Message]) -> None:
        while True:
            held = [(head[0], i) for i, head in enumerate(self._heads) if head is not None]
            if not held:
                self._waiting_since = None
                return
            key, index = min(held)
            complete = len(held) == len(self.sockets)
            if key == _EOS_KEY:
                self._waiting_since = None  # nothing to skip: wait for the other markers
                if not complete:
                    return
                out.append(self._end_of_stream())
                continue
            timed_out = (
                self._waiting_since is not None
                and time.monotonic() - self._waiting_since >= self._reorder_timeout
            )
            if key == self._next_seq or complete or timed_out:
                if self._next_seq is not None and key > self._next_seq:
                    self.skipped += int(key) - self._next_seq
                self._next_seq = int(key) + 1
                out.append(self._pop(index))
                self._waiting_since = None
                continue
            if self._waiting_since is None:  # a gap: wait for the missing item, bounded
                self._waiting_since = time.monotonic()
            return

    def _end_of_stream(self) -> Message:
        """Every input's head is an end-of-stream marker: pass one on, consume them all."""
        markers = [self._pop(i) for i in range(len(self.sockets))]
        return markers[0]

    def _pop(self, index: int) -> Message:
        head = self._heads[index]
        assert head is not None
        self._heads[index] = None
        return head[1]


def messages_in(message: Message) -> list[Message]:
    """The messages a received one holds: itself, or those of a batch."""
    if transport.is_batch(message):
        return _unbatch(message)
    return [message]


def _unbatch(message: Message) -> list[Message]:
    """The messages of a batch; a malformed one as it is, which its handler refuses
    (``unpack_envelope``: "a malformed batch"), counted and logged as any malformed input."""
    try:
        return transport.unpack_batch(message[0])
    except DecodeError:
        return [message]


def _peek(message: Message) -> tuple[int | None, int]:
    try:
        kind, seq, _ = transport.unpack_envelope(message[0])
    except DecodeError:
        return None, 0
    return kind, seq
