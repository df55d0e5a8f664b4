"""Encoding a data item into frames (``encode``), and the same rules without building
them (``check``, for ``serialize()``); the format is described in ``codec.py``."""

from __future__ import annotations

from typing import Any, Protocol

import msgpack
import numpy as np

from pystream_zmq.errors import ItemTooLargeError, UnsupportedTypeError
from pystream_zmq.wire.format import (
    DEFAULT_MAX_CONTAINER_LEN,
    DEFAULT_MAX_MESSAGE_BYTES,
    EXT_ARRAY,
    EXT_BUFFER,
    EXT_SCALAR,
    EXT_SHARED,
    EXT_TUPLE,
    INT_MAX,
    INT_MIN,
    KINDS,
    MAX_DEPTH,
    OUT_OF_BAND_MIN_BYTES,
    PLAIN,
    show,
)


class _Refused(Exception):
    """Raised inside the walk; collects the key path while unwinding (free when nothing fails)."""

    def __init__(self, reason: str, error: type[Exception] = UnsupportedTypeError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.keys: list[object] = []


class Placer(Protocol):
    """Where large arrays may go instead of frames (``pystream_zmq.shm.sender.Allocator``)."""

    def place(self, arr: np.ndarray[Any, Any]) -> tuple[int, int, int, int] | None:
        """Copy ``arr`` in: (pool, entry, generation, offset), or None for a frame."""

    def cancel(self, entries: list[int]) -> None:
        """Free what ``place`` took for an item that is not sent after all."""


class _Arrays(list[np.ndarray[Any, Any]]):
    """The arrays that go as frames, and what went to a Placer instead."""

    __slots__ = ("placed", "placer", "shared_bytes")

    def __init__(self, placer: Placer) -> None:
        super().__init__()
        self.placer = placer
        self.placed: list[int] = []  # the entries taken, to cancel if the item fails
        self.shared_bytes = 0


def encode_shared(
    obj: object,
    placer: Placer,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_container_len: int = DEFAULT_MAX_CONTAINER_LEN,
) -> tuple[list[bytes | memoryview], list[int]]:
    """``encode``, with every array that ``placer`` takes copied into shared memory and
    described in the header (``EXT_SHARED``) instead of sent as a frame: (frames, the
    entries taken). Whoever does not send the frames gives the entries back
    (``placer.cancel``); when encoding fails, that is done here."""
    arrays = _Arrays(placer)
    try:
        frames = _encode(obj, arrays, max_message_bytes, max_container_len)
    except BaseException:
        placer.cancel(arrays.placed)
        raise
    return frames, arrays.placed


def encode(
    obj: object,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_container_len: int = DEFAULT_MAX_CONTAINER_LEN,
) -> list[bytes | memoryview]:
    """Turn ``obj`` into frames: a msgpack header, then one frame per large array.

    Subclasses of dict, list and tuple (OrderedDict, defaultdict, namedtuple) are sent as
    plain dict, list and tuple; subclasses of str, bytes, int and float (e.g. IntEnum) as
    their base type. ndarray subclasses (masked arrays, matrices) are refused, as are sets,
    bytearray and every other type: ``UnsupportedTypeError`` names the key path, e.g.
    ``data['items'][3]: cannot send a set``. What a receiver with the same limits would
    refuse is refused here, as ``ItemTooLargeError``: a container of more than
    ``max_container_len`` items, or frames of more than ``max_message_bytes`` in all.
    """
    return _encode(obj, [], max_message_bytes, max_container_len)


def _encode(
    obj: object, arrays: list[np.ndarray[Any, Any]], max_message_bytes: int, max_container_len: int
) -> list[bytes | memoryview]:
    try:
        tree = _walk(obj, arrays, 0, max_container_len)
    except _Refused as e:
        raise _error(e) from None
    header = msgpack.packb(tree)
    size = len(header) + (arrays.shared_bytes if type(arrays) is _Arrays else 0)
    for arr in arrays:
        size += arr.nbytes
    if size > max_message_bytes:
        raise _too_large(size, max_message_bytes)
    frames: list[bytes | memoryview] = [header]
    for arr in arrays:  # copied only now that the whole item is known sendable
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)  # the one copy; contiguous arrays go as they are
        # A uint8 view: the buffer protocol refuses some dtypes (e.g. non-native longdouble).
        frames.append(arr.reshape(-1).view(np.uint8).data)
    return frames


def check(
    obj: object,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_container_len: int = DEFAULT_MAX_CONTAINER_LEN,
) -> None:
    """Raise what ``encode`` would raise for ``obj`` under the same limits, the same error
    with the same message, and nothing else; build no frames, copy no large array.

    A walk by ``encode``'s rules that adds up a bound of the encoded size as it goes: some
    60 % of ``encode``'s time on a small dict, a fifth on a dict holding an image (even a
    non-contiguous one, which ``encode`` copies). Only when the bound is over
    ``max_message_bytes`` is the header encoded, large arrays left out, for the exact size.
    """
    try:
        bound = _bound(obj, 0, max_container_len)
    except _Refused as e:
        raise _error(e) from None
    if bound > max_message_bytes:  # the exact size, from the header and the arrays' sizes
        arrays: list[np.ndarray[Any, Any]] = []
        size = len(msgpack.packb(_walk(obj, arrays, 0, max_container_len)))
        size += sum(arr.nbytes for arr in arrays)
        if size > max_message_bytes:
            raise _too_large(size, max_message_bytes)


def _too_large(size: int, limit: int) -> ItemTooLargeError:
    return ItemTooLargeError(
        f"data: {size} bytes encoded, over the {limit}-byte message limit (max_message_bytes)"
    )


def _error(refused: _Refused) -> Exception:
    path = "data" + "".join(f"[{key!r}]" for key in reversed(refused.keys))
    return refused.error(f"{path}: {refused.reason}")


def _walk(obj: object, arrays: list[np.ndarray[Any, Any]], depth: int, limit: int) -> object:
    kind = type(obj)
    if kind is str:
        return _text(obj)  # type: ignore[arg-type]
    if kind in PLAIN:
        return obj
    if kind is int:
        return _int(obj)  # type: ignore[arg-type]
    if isinstance(obj, (dict, list, tuple)):
        if depth >= MAX_DEPTH:
            raise _Refused(_TOO_DEEP)
        if len(obj) > limit:
            raise _Refused(_too_long(obj, limit), ItemTooLargeError)
        if isinstance(obj, dict):
            return _walk_dict(obj, arrays, depth + 1, limit)
        items = []
        for index, item in enumerate(obj):
            try:
                items.append(_walk(item, arrays, depth + 1, limit))
            except _Refused as e:
                e.keys.append(index)
                raise
        return items if isinstance(obj, list) else msgpack.ExtType(EXT_TUPLE, msgpack.packb(items))
    if kind is np.ndarray:
        return _array(obj, arrays)  # type: ignore[arg-type]
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in KINDS:
            raise _Refused(_numpy_scalar(obj))
        return msgpack.ExtType(EXT_SCALAR, msgpack.packb((obj.dtype.str, obj.tobytes())))
    if isinstance(obj, int):
        return _int(obj)
    if isinstance(obj, str):
        return _text(obj)
    if isinstance(obj, (bytes, float)):
        return obj
    raise _Refused(f"cannot send a {kind.__name__}")


def _walk_dict(
    obj: dict[Any, Any], arrays: list[np.ndarray[Any, Any]], depth: int, limit: int
) -> object:
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise _Refused(_key_reason(key))
        try:
            _text(key)
            out[key] = _walk(value, arrays, depth, limit)
        except _Refused as e:
            e.keys.append(key)
            raise
    return out


# What _bound counts: a msgpack header (str, bin, array, map, ext) takes at most 6 bytes, a
# number at most 9, a str at most 4 bytes per character. _ITEM is at least a number, or the
# headers of a str, bytes or container (a tuple's ext and list); _ARRAY_HEADER at least an
# array's or numpy scalar's ext and fields, but its data and 9 bytes per dim of its shape.
_ITEM, _ARRAY_HEADER = 11, 40
_NONE = type(None)


def _bound(obj: object, depth: int, limit: int) -> int:
    """At least the bytes ``obj`` takes in the header and out-of-band frames; raises the
    _Refused that ``_walk`` would, since it takes the same branches in the same order
    (the exact-type tests come first in both, and exact types exclude each other)."""
    kind = type(obj)
    if kind is str:
        return _ITEM + 4 * len(_text(obj))  # type: ignore[arg-type]
    if kind is bytes:
        return _ITEM + 4 * len(obj)  # type: ignore[arg-type]
    if kind is float or kind is bool or kind is _NONE:
        return _ITEM
    if kind is int:
        _int(obj)  # type: ignore[arg-type]
        return _ITEM
    if isinstance(obj, (dict, list, tuple)):
        if depth >= MAX_DEPTH:
            raise _Refused(_TOO_DEEP)
        if len(obj) > limit:
            raise _Refused(_too_long(obj, limit), ItemTooLargeError)
        size = _ITEM
        depth += 1
        if isinstance(obj, dict):
            for key, value in obj.items():
                if not isinstance(key, str):
                    raise _Refused(_key_reason(key))
                try:
                    size += _ITEM + 4 * len(_text(key)) + _bound(value, depth, limit)
                except _Refused as e:
                    e.keys.append(key)
                    raise
            return size
        for index, item in enumerate(obj):
            try:
                size += _bound(item, depth, limit)
            except _Refused as e:
                e.keys.append(index)
                raise
        return size
    if kind is np.ndarray:
        if obj.dtype.kind not in KINDS:  # type: ignore[attr-defined]
            raise _Refused(_numpy_array(obj))  # type: ignore[arg-type]
        return _ARRAY_HEADER + 9 * obj.ndim + obj.nbytes  # type: ignore[attr-defined]
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in KINDS:
            raise _Refused(_numpy_scalar(obj))
        return _ARRAY_HEADER + obj.nbytes
    if isinstance(obj, int):
        _int(obj)
        return _ITEM
    if isinstance(obj, str):
        return _ITEM + 4 * len(_text(obj))
    if isinstance(obj, bytes):
        return _ITEM + 4 * len(obj)
    if isinstance(obj, float):
        return _ITEM
    raise _Refused(f"cannot send a {kind.__name__}")


# -- what both walks say when they refuse ----------------------------------------------------
_TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels"


def _too_long(obj: dict[Any, Any] | list[Any] | tuple[Any, ...], limit: int) -> str:
    kind = type(obj).__name__
    return f"a {kind} of {len(obj)} items, over the limit of {limit} per container"


def _key_reason(key: object) -> str:
    return f"dict key {show(key)} is a {type(key).__name__}; only str keys can be sent"


def _numpy_array(arr: np.ndarray[Any, Any]) -> str:
    return f"cannot send a numpy array of dtype {arr.dtype}"


def _numpy_scalar(value: np.generic[Any]) -> str:
    return f"cannot send a numpy {type(value).__name__}"


def _int(value: int) -> int:
    if not INT_MIN <= value <= INT_MAX:
        raise _Refused(f"int of {value.bit_length()} bits is outside the 64-bit range")
    return value


def _text(text: str) -> str:
    """``text`` if msgpack can send it: not a lone surrogate (``os.fsdecode`` of bytes that
    are not UTF-8 makes them). ``isascii`` costs nothing: CPython knows it of every str."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as e:
            bad = e.object[e.start : e.end]
            raise _Refused(f"a str that is not valid UTF-8 ({bad!r})") from None
    return text


def _array(arr: np.ndarray[Any, Any], arrays: list[np.ndarray[Any, Any]]) -> msgpack.ExtType:
    if arr.dtype.kind not in KINDS:
        raise _Refused(_numpy_array(arr))
    shape = list(arr.shape)
    if arr.nbytes < OUT_OF_BAND_MIN_BYTES:
        return msgpack.ExtType(EXT_ARRAY, msgpack.packb((arr.dtype.str, shape, arr.tobytes())))
    if type(arrays) is _Arrays:
        spot = arrays.placer.place(arr)  # the one copy, into shared memory
        if spot is not None:
            arrays.placed.append(spot[1])
            arrays.shared_bytes += arr.nbytes
            return msgpack.ExtType(EXT_SHARED, msgpack.packb((arr.dtype.str, shape, *spot)))
    arrays.append(arr)  # a frame of its own (encode), no copy yet
    return msgpack.ExtType(EXT_BUFFER, msgpack.packb((arr.dtype.str, shape, len(arrays))))
