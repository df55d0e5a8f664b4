"""Items as other programs send them: one msgpack frame in msgpack-numpy's layout, what the
usual hand-written camera script sends (``msgpack.packb(item, default=msgpack_numpy.encode)``)
and reads (``msgpack.unpackb(frame, object_hook=msgpack_numpy.decode)``).

msgpack-numpy (0.4.8) writes an array as a map with bytes keys, ``{b"nd": True, b"type":
dtype.str, b"kind": b"", b"shape": shape, b"data": raw C-order bytes}``, a numpy scalar as
``{b"nd": False, b"type": dtype.str, b"data": raw bytes}`` and a Python complex as
``{b"complex": True, b"data": repr(z)}``. Its own decoder must never see network input:
``b"kind": b"O"`` goes to ``pickle.loads``, dtype ``|O`` with data crashes numpy, dtype
``S`` with shape ``[-1]`` kills the interpreter. ``decode`` reads the same layout with the
checks of our own codec instead (``codec.array_from``): bool/int/uint/float/complex dtypes
named by a str, never a structured or object dtype, and a shape whose size is the data's.
No pickle, ever. msgpack has no tuple: tuples arrive as lists, in both directions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from pystream_zmq.errors import DecodeError, ItemTooLargeError, UnsupportedTypeError
from pystream_zmq.wire import codec

if TYPE_CHECKING:
    import zmq
    from typing_extensions import Buffer

__all__ = ["decode", "encode"]

_KINDS = frozenset("biufc")
# msgpack-numpy writes b"" for every dtype but structured (b"V") and object (b"O") ones,
# whose b"type" is a list; versions before 0.4 wrote no b"kind" at all.
_PLAIN_KINDS = frozenset({b"", b"b", b"i", b"u", b"f", b"c"})


def decode(
    frames: list[Buffer | zmq.Frame],
    *,
    max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES,
    max_container_len: int = codec.DEFAULT_MAX_CONTAINER_LEN,
) -> object:
    """The item in a msgpack-numpy message of one frame: its arrays writeable copies, its
    numpy scalars numpy scalars, its maps with str keys dicts. ``DecodeError`` for anything
    else, and nothing else."""
    if len(frames) != 1:
        raise DecodeError(f"a msgpack-numpy message is one frame, not {len(frames)}")
    return codec.decode_plain(
        frames[0],
        _numpy_map,
        max_message_bytes=max_message_bytes,
        max_container_len=max_container_len,
    )


def _numpy_map(fields: dict[Any, Any]) -> object:
    """msgpack's object_hook: a map that msgpack-numpy made becomes what it stands for."""
    if b"nd" in fields:
        return _array(fields)
    if b"complex" in fields:
        text = fields.get(b"data")
        if fields[b"complex"] is not True or type(text) is not str:
            raise DecodeError("malformed msgpack-numpy complex")
        return complex(text)  # a parser of numbers, never eval
    return fields


def _array(fields: dict[Any, Any]) -> object:
    nd, kind, data = fields[b"nd"], fields.get(b"kind", b""), fields.get(b"data")
    if type(kind) is not bytes or kind not in _PLAIN_KINDS:
        # b"O" is a pickle, b"V" a structured dtype: neither is ever read.
        raise DecodeError(f"msgpack-numpy array of kind {kind!r}: only bool and numbers")
    if type(data) is not bytes:
        raise DecodeError("msgpack-numpy data missing or not bin (sent with use_bin_type=False?)")
    if nd is True:
        return codec.array_from(fields.get(b"type"), fields.get(b"shape"), data)
    if nd is False:  # a numpy scalar
        return codec.array_from(fields.get(b"type"), [], data)[()]
    raise DecodeError("msgpack-numpy b'nd' is neither true nor false")


def encode(obj: object, *, max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
    """``obj`` as one frame that ``msgpack_numpy.decode`` reads back: arrays and numpy
    scalars of bool and number dtypes in msgpack-numpy's layout, the rest plain msgpack.
    ``UnsupportedTypeError`` for what it cannot carry (a set, an object array, an int past
    64 bits); ``ItemTooLargeError`` over ``max_message_bytes``."""
    try:
        frame: bytes = msgpack.packb(obj, default=_numpy_fields, use_bin_type=True)
    except UnsupportedTypeError:
        raise
    except (TypeError, ValueError, OverflowError) as e:  # msgpack's own refusals
        raise UnsupportedTypeError(f"data: cannot send as msgpack-numpy: {e}") from e
    if len(frame) > max_message_bytes:
        raise ItemTooLargeError(
            f"data: {len(frame)} bytes encoded, over the {max_message_bytes}-byte message "
            "limit (max_message_bytes)"
        )
    return frame


def _numpy_fields(obj: object) -> dict[bytes, Any]:
    """msgpack's default: what plain msgpack cannot carry, as msgpack-numpy lays it out."""
    if type(obj) is np.ndarray:
        if obj.dtype.kind not in _KINDS:
            raise UnsupportedTypeError(f"data: cannot send a numpy array of dtype {obj.dtype}")
        flat = np.ascontiguousarray(obj).reshape(-1).view(np.uint8)  # a copy only if strided
        return {
            b"nd": True,
            b"type": obj.dtype.str,
            b"kind": b"",
            b"shape": list(obj.shape),
            b"data": flat.data,
        }
    if isinstance(obj, np.generic) and obj.dtype.kind in _KINDS:
        return {b"nd": False, b"type": obj.dtype.str, b"data": obj.tobytes()}
    if type(obj) is complex:
        return {b"complex": True, b"data": repr(obj)}
    if isinstance(obj, int):  # msgpack hands over the ints it cannot pack
        raise UnsupportedTypeError(f"data: int of {obj.bit_length()} bits is past 64 bits")
    raise UnsupportedTypeError(f"data: cannot send a {type(obj).__name__} as msgpack-numpy")
