"""ZeroMQ plumbing shared by the orchestrator and the workers: socket set-up, the envelope
that precedes every item on the data path, and the control-channel vocabulary."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import zmq

from pystream_zmq.errors import DecodeError

DEFAULT_HWM = 2
RECONNECT_IVL_MS = 10
RECONNECT_IVL_MAX_MS = 1000

# What a link does when the receiver cannot keep up (see README, "Real time").
BLOCK = "block"  # wait for room: lossless backpressure
LATEST = "latest"  # a newer item replaces the one waiting; the older is dropped and counted
DROP_NEWEST = "drop-newest"  # refuse the new item when the first stage is full (source only)
DROP_POLICIES = (BLOCK, LATEST, DROP_NEWEST)
LINK_POLICIES = (BLOCK, LATEST)  # between workers: a refused item would need a marker anyway

# Data path: [envelope + codec header, *out-of-band buffers]; a marker is the envelope alone.
# The envelope is fixed-size so a worker can route an end-of-stream marker without decoding
# anything. It shares the header's frame: a frame more per item cost ZeroMQ ~40% more CPU
# per small item (a hand-written msgpack chain: 60 -> 95 us per item over two processes).
KIND_DATA = 0
KIND_EOS = 1
KIND_DROPPED = 2  # dropped by a stage (it raised), a drop policy or the deadline; no payload
KIND_FAILED = 3  # a stage raised under on_error="raise": payload describes the error
# Several one-frame messages in one frame, sent when items come quicker than ZeroMQ's
# per-message cost (a send, a wake-up of each I/O thread, a poll and a receive): the
# envelope with their count as its sequence number, then each as a 4-byte length and its
# bytes. Only a receiver's ``Inputs`` ever sees one: it hands the messages on one by one.
KIND_BATCH = 4
BATCH_MAX_BYTES = 32 * 1024  # a batch is sent before it grows past this
BATCH_MAX_ITEMS = 256
# The sequence number of an end-of-stream marker between pystream-worker processes that
# says the source's items have all been sent (the chain then ends by itself), not that a
# process is stopping (0).
END_OF_DATA = 2**64 - 1
_KINDS = (KIND_DATA, KIND_EOS, KIND_DROPPED, KIND_FAILED)
_ENVELOPE = struct.Struct("<BQd")  # kind, sequence number, time the source sent it
_LENGTH = struct.Struct("<I")


def pack_envelope(kind: int, seq: int, sent_at: float) -> bytes:
    """A marker: a message of the envelope alone."""
    return _ENVELOPE.pack(kind, seq, sent_at)


def pack_message(kind: int, seq: int, sent_at: float, frames: Sequence[Any]) -> list[Any]:
    """An item: ``frames`` from ``codec.encode``, the envelope in front of the header."""
    return [_ENVELOPE.pack(kind, seq, sent_at) + frames[0], *frames[1:]]


def unpack_envelope(frame: Any) -> tuple[int, int, float]:
    """(kind, seq, sent_at) from the first frame of a message."""
    buf = memoryview(frame)
    if buf.nbytes < _ENVELOPE.size:
        raise DecodeError(f"envelope has {buf.nbytes} bytes, expected {_ENVELOPE.size}")
    kind, seq, sent_at = _ENVELOPE.unpack_from(buf)
    if kind not in _KINDS:
        what = "a malformed batch" if kind == KIND_BATCH else f"unknown envelope kind {kind}"
        raise DecodeError(what)
    return kind, seq, sent_at


def is_batch(message: Sequence[Any]) -> bool:
    """Whether a received message is a batch (its one frame says so)."""
    if len(message) != 1:
        return False
    buf = memoryview(message[0])
    return buf.nbytes >= _ENVELOPE.size and buf[0] == KIND_BATCH


def pack_batch(messages: Sequence[bytes]) -> bytes:
    """One frame holding ``messages``, each the single frame of a message."""
    parts = [_ENVELOPE.pack(KIND_BATCH, len(messages), 0.0)]
    for message in messages:
        parts += (_LENGTH.pack(len(message)), message)
    return b"".join(parts)


def unpack_batch(frame: Any) -> list[list[Any]]:
    """The messages in a batch (views of ``frame``, one frame each); ``DecodeError`` for
    a malformed one, so that nothing in it is taken."""
    buf = memoryview(frame)
    count = _ENVELOPE.unpack_from(buf)[1]
    messages: list[list[Any]] = []
    at, end = _ENVELOPE.size, buf.nbytes
    while at < end:
        if at + _LENGTH.size > end:
            raise DecodeError("a batch ends inside a length")
        (length,) = _LENGTH.unpack_from(buf, at)
        at += _LENGTH.size
        if length < _ENVELOPE.size or at + length > end or buf[at] == KIND_BATCH:
            raise DecodeError("a batch holds a malformed message")
        messages.append([buf[at : at + length]])
        at += length
    if len(messages) != count:
        raise DecodeError(f"a batch says {count} messages and holds {len(messages)}")
    return messages


def payload(message: Sequence[Any]) -> list[Any]:
    """The codec frames of an item: its header (after the envelope), then its buffers."""
    return [memoryview(message[0])[_ENVELOPE.size :], *message[1:]]


# Control channel: the orchestrator's ROUTER talks to each worker's DEALER. A command is
# [command, request id]; its reply is [kind, the same request id, ...], so that a late
# reply is never taken for the answer to a later command.
# worker -> orchestrator, unasked: [kind, token, ...], the token from the worker's spec
READY = b"ready"  # + the endpoints it bound
FAILED = b"failed"  # + traceback text
# worker -> orchestrator, replies: [kind, request id, ...]
STATE = b"state"  # + 8-byte LE count of profile events sent + codec frames of {path: {attr: value}}
BYE = b"bye"  # + codec frames of the worker's counters
# orchestrator -> worker: [command, request id]
GET_STATE = b"get-state"
GET_COUNTERS = b"get-counters"  # reply COUNTERS + codec frames of the worker's counters
CLEANUP = b"cleanup"  # run every stage's cleanup(), then reply STATE
STOP = b"stop"  # flush profile events, reply BYE, wait for stdin to close

# Profile channel: [EVENTS, packed events] and [COUNTERS, codec frames of
# {path: {name: value}}] ... then [PROFILE_END, worker id] once at stop.
EVENTS = b"events"
COUNTERS = b"counters"
PROFILE_END = b"end"


def make_socket(ctx: zmq.Context[Any], kind: int, hwm: int = DEFAULT_HWM) -> zmq.Socket[Any]:
    """A socket with explicit linger (so closing never hangs), a bounded queue and quick
    reconnection."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    # A worker connects its output as soon as it starts, often before the next worker has
    # bound its input; ZeroMQ's default retry (100-200 ms) then held the first items back
    # that long. Retry after 10-20 ms, backing off to 1 s while a peer stays away.
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    return sock


def ipc_endpoint(directory: str, name: str) -> str:
    return f"ipc://{directory}/{name}"
