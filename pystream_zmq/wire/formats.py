"""What a receiver reads and a sender writes on a data link: ``pystream``, our own messages
(envelope, codec header, out-of-band arrays; ``transport.py``), or ``msgpack-numpy``, one
plain msgpack frame per item to or from a program outside PyStream (``foreign_codec.py``).

Inside a process every message looks like ours. A foreign message gets an envelope in front
when it is received (``Inputs(foreign=True)``): data, the receiver's own next sequence
number (the sender has none), the time it arrived. On the way out, ``ForeignOutputs`` sends
the item alone and keeps every marker to itself (end of stream, dropped, failed): a foreign
receiver would take them for items.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from pystream_zmq.wire import codec, foreign_codec, transport
from pystream_zmq.wire.outputs import Outputs

if TYPE_CHECKING:
    from pystream_zmq.shm.receiver import Views

PYSTREAM = "pystream"
MSGPACK_NUMPY = "msgpack-numpy"
FORMATS = (PYSTREAM, MSGPACK_NUMPY)

Message = list[Any]  # as Inputs gives it: [envelope (+ header), *frames]
Decoder = Callable[[Message], object]
Packer = Callable[[int, int, float, object], Message]


def decoder(name: str, max_message_bytes: int, shared: Views | None = None) -> Decoder:
    """How a receiver reads the item in a data message (after its envelope); every failure
    is a ``DecodeError``. The arrays are writeable and the receiver's own (``shared``: the
    shared-memory pools it may read, ``pystream_zmq.shm``)."""
    if name == MSGPACK_NUMPY:
        return functools.partial(_decode_foreign, max_message_bytes=max_message_bytes)
    return functools.partial(_decode_ours, max_message_bytes=max_message_bytes, shared=shared)


def packer(name: str, max_message_bytes: int, placer: codec.Placer | None = None) -> Packer:
    """``pack(kind, seq, sent_at, item)``: the message a sender hands to its outputs.
    ``PyStreamError`` (UnsupportedTypeError, ItemTooLargeError) for what it cannot send.
    ``placer``: large arrays go to this shared-memory pool when it has room."""
    if name == MSGPACK_NUMPY:
        return functools.partial(_pack_foreign, max_message_bytes=max_message_bytes)
    if placer is not None:
        return functools.partial(_pack_shared, max_message_bytes=max_message_bytes, placer=placer)
    return functools.partial(_pack_ours, max_message_bytes=max_message_bytes)


def outputs(name: str, sockets: list[zmq.Socket[Any]]) -> Outputs:
    return ForeignOutputs(sockets) if name == MSGPACK_NUMPY else Outputs(sockets)


def _decode_ours(message: Message, max_message_bytes: int, shared: Views | None) -> object:
    # adopt: the frames were just received, and are the receiver's alone.
    payload = transport.payload(message)
    return codec.decode(payload, max_message_bytes=max_message_bytes, adopt=True, shared=shared)


def _decode_foreign(message: Message, max_message_bytes: int) -> object:
    return foreign_codec.decode(message[1:], max_message_bytes=max_message_bytes)


def _pack_ours(
    kind: int, seq: int, sent_at: float, item: object, max_message_bytes: int
) -> Message:
    frames = codec.encode(item, max_message_bytes=max_message_bytes)
    return transport.pack_message(kind, seq, sent_at, frames)


def _pack_shared(
    kind: int, seq: int, sent_at: float, item: object, max_message_bytes: int, placer: codec.Placer
) -> Message:
    frames, _ = codec.encode_shared(item, placer, max_message_bytes=max_message_bytes)
    return transport.pack_message(kind, seq, sent_at, frames)


def _pack_foreign(
    kind: int, seq: int, sent_at: float, item: object, max_message_bytes: int
) -> Message:
    # The envelope in a frame of its own, which ForeignOutputs leaves out.
    frame = foreign_codec.encode(item, max_message_bytes=max_message_bytes)
    return [transport.pack_envelope(kind, seq, sent_at), frame]


class ForeignOutputs(Outputs):
    """Outputs to a program outside PyStream: of a data message, only the frame after its
    envelope goes out; a marker goes nowhere, and counts as sent."""

    def send(self, frames: list[Any], timeout_ms: int, *, copy: bool = True) -> bool:
        if _is_marker(frames):
            return True
        return super().send(frames[1:], timeout_ms, copy=False)

    def try_send(
        self, frames: list[Any], *, copy: bool = True, track: bool = False
    ) -> tuple[bool, zmq.MessageTracker | None]:
        if _is_marker(frames):
            return True, None
        # bytes, which nothing can change: sent without a copy (pyzmq copies small frames
        # anyway), with nothing to track.
        return super().try_send(frames[1:], copy=False)


def _is_marker(frames: list[Any]) -> bool:
    return transport.unpack_envelope(frames[0])[0] != transport.KIND_DATA
