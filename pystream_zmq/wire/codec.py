"""Wire format of data items: ``encode(obj) -> frames`` and ``decode(frames) -> obj``;
``check(obj)`` raises what ``encode`` would, without encoding (``serialize()``'s check).

A message is a list of ZeroMQ frames. ``frames[0]`` is a msgpack header holding the object
tree; dicts (str keys), lists, str, bytes, int, float, bool and None are plain msgpack. The
rest are ExtTypes whose payload is itself msgpack:

- ``EXT_TUPLE`` (1): a list of items, decoded as a tuple.
- ``EXT_ARRAY`` (2): ``[dtype.str, shape, raw C-order bytes]``, a small numpy array inline.
- ``EXT_BUFFER`` (3): ``[dtype.str, shape, frame index]``, an array whose C-order bytes are
  the whole frame ``frames[index]``. Arrays of ``OUT_OF_BAND_MIN_BYTES`` or more travel this
  way, as zero-copy memoryviews; each frame after the header is referenced exactly once.
- ``EXT_SCALAR`` (4): ``[dtype.str, raw bytes]``, a numpy scalar.

Byte order is kept as it is (``'>f4'`` arrives as ``'>f4'``). Decoding treats every frame
as hostile: no pickle, only bool/int/uint/float/complex dtypes, sizes checked before any
allocation, and every failure raised as one ``DecodeError``. ``decode_plain`` reads
another program's single msgpack frame under the same checks (``wire/foreign_codec.py``).
"""

from __future__ import annotations

import functools
import math
import re
import reprlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from pystream_zmq.errors import DecodeError, ItemTooLargeError, UnsupportedTypeError

if TYPE_CHECKING:
    import zmq
    from typing_extensions import Buffer

__all__ = [
    "DEFAULT_MAX_CONTAINER_LEN",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_DEPTH",
    "OUT_OF_BAND_MIN_BYTES",
    "array_from",
    "check",
    "decode",
    "decode_plain",
    "encode",
]

OUT_OF_BAND_MIN_BYTES = 64 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_CONTAINER_LEN = 1_000_000
MAX_DEPTH = 100  # levels of nested containers; far below Python's recursion limit
EXT_TUPLE, EXT_ARRAY, EXT_BUFFER, EXT_SCALAR = 1, 2, 3, 4

_KINDS = frozenset("biufc")
_PLAIN = frozenset({str, float, bool, bytes, type(None)})  # msgpack carries these as they are
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_MAX_NDIM = 64  # numpy's own limit; also keeps the shape product cheap
# Only names like '<f4', '|b1', 'c16' ever reach np.dtype, whose parser accepts far more.
_DTYPE_NAME = re.compile(r"[<>|=]?[biufc][0-9]{1,2}")


class _Refused(Exception):
    """Raised inside the walk; collects the key path while unwinding (free when nothing fails)."""

    def __init__(self, reason: str, error: type[Exception] = UnsupportedTypeError) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.keys: list[object] = []


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
    arrays: list[np.ndarray[Any, Any]] = []
    try:
        tree = _walk(obj, arrays, 0, max_container_len)
    except _Refused as e:
        raise _error(e) from None
    try:
        header = msgpack.packb(tree)
    except UnicodeEncodeError as e:  # a lone surrogate (os.fsdecode of undecodable bytes)
        bad = e.object[e.start : e.end]
        raise UnsupportedTypeError(f"data: a str that is not valid UTF-8 ({bad!r})") from None
    size = len(header)
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
    if kind in _PLAIN:
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
        if obj.dtype.kind not in _KINDS:
            raise _Refused(_numpy_scalar(obj))
        return msgpack.ExtType(EXT_SCALAR, msgpack.packb((obj.dtype.str, obj.tobytes())))
    if isinstance(obj, int):
        return _int(obj)
    if isinstance(obj, (str, bytes, float)):
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
    if kind is str or kind is bytes:
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
                    size += _ITEM + 4 * len(key) + _bound(value, depth, limit)
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
        if obj.dtype.kind not in _KINDS:  # type: ignore[attr-defined]
            raise _Refused(_numpy_array(obj))  # type: ignore[arg-type]
        return _ARRAY_HEADER + 9 * obj.ndim + obj.nbytes  # type: ignore[attr-defined]
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in _KINDS:
            raise _Refused(_numpy_scalar(obj))
        return _ARRAY_HEADER + obj.nbytes
    if isinstance(obj, int):
        _int(obj)
        return _ITEM
    if isinstance(obj, (str, bytes)):
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
    return f"dict key {_show(key)} is a {type(key).__name__}; only str keys can be sent"


def _numpy_array(arr: np.ndarray[Any, Any]) -> str:
    return f"cannot send a numpy array of dtype {arr.dtype}"


def _numpy_scalar(value: np.generic[Any]) -> str:
    return f"cannot send a numpy {type(value).__name__}"


def _int(value: int) -> int:
    if not _INT_MIN <= value <= _INT_MAX:
        raise _Refused(f"int of {value.bit_length()} bits is outside the 64-bit range")
    return value


def _array(arr: np.ndarray[Any, Any], arrays: list[np.ndarray[Any, Any]]) -> msgpack.ExtType:
    if arr.dtype.kind not in _KINDS:
        raise _Refused(_numpy_array(arr))
    shape = list(arr.shape)
    if arr.nbytes < OUT_OF_BAND_MIN_BYTES:
        return msgpack.ExtType(EXT_ARRAY, msgpack.packb((arr.dtype.str, shape, arr.tobytes())))
    arrays.append(arr)  # a frame of its own (encode), no copy yet
    return msgpack.ExtType(EXT_BUFFER, msgpack.packb((arr.dtype.str, shape, len(arrays))))


def _show(value: object) -> str:
    try:
        return reprlib.repr(value)
    except Exception:  # a hostile __repr__ must not hide the real error
        return "?"


def decode(
    frames: Sequence[Buffer | zmq.Frame],
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_container_len: int = DEFAULT_MAX_CONTAINER_LEN,
    adopt: bool = False,
) -> object:
    """Rebuild the object from ``frames`` (bytes, bytearray, memoryview or zmq.Frame).

    Arrays come back writeable, each copied exactly once, never aliasing the frames, unless
    ``adopt``: the frames are the caller's to give away (zmq.Frames it has just received
    with copy=False, that nothing else references), and an out-of-band array whose frame is
    writeable and aligned is a view on it, no copy; the array keeps its frame alive.
    Raises ``DecodeError`` for any malformed input and nothing else. Left unchecked on
    purpose: bytes dict keys pass (a check per map costs ~60% on dict-heavy messages, and
    ``encode`` refuses them downstream); msgpack's timestamp ext (-1) arrives as a float.
    """
    try:
        views = [_frame_view(frame) for frame in frames]
        if not views:
            raise DecodeError("empty message: no frames")
        size = sum(view.nbytes for view in views)
        if size > max_message_bytes:
            raise DecodeError(f"message of {size} bytes is over the {max_message_bytes} limit")
        decoder = _Decoder(views, max_container_len, max_message_bytes, adopt)
        obj = decoder.unpack(views[0], decoder.ext_hook)
        if decoder.made:
            obj = decoder.expand(obj)
        unused = decoder.used.count(False) - 1  # the header is never referenced
        if unused:
            raise DecodeError(f"{unused} frame(s) not referenced by the header")
        return obj
    except DecodeError:
        raise
    except Exception as e:  # msgpack, numpy and memoryview errors alike
        raise DecodeError(f"malformed message: {type(e).__name__}: {str(e)[:200]}") from e


def decode_plain(
    frame: Buffer | zmq.Frame,
    object_hook: Callable[[dict[Any, Any]], object],
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_container_len: int = DEFAULT_MAX_CONTAINER_LEN,
) -> object:
    """One frame of plain msgpack from another program, under ``decode``'s limits: no ext
    type but msgpack's timestamp (a float), and every map through ``object_hook``, which
    reads the sender's own layout (msgpack-numpy's arrays: ``wire/foreign_codec.py``).
    Raises ``DecodeError`` for any malformed input, whatever raised it, and nothing else."""
    try:
        view = _frame_view(frame)
        if view.nbytes > max_message_bytes:
            raise DecodeError(f"message of {view.nbytes} bytes is over the {max_message_bytes} cap")
        decoder = _Decoder([view], max_container_len, max_message_bytes, False, object_hook)
        return decoder.unpack(view, _no_plain_ext)
    except DecodeError:
        raise
    except Exception as e:  # msgpack, numpy and the hook's own errors alike
        raise DecodeError(f"malformed message: {type(e).__name__}: {str(e)[:200]}") from e


def _frame_view(frame: object) -> memoryview:
    view = memoryview(frame)  # type: ignore[arg-type]
    if not view.c_contiguous:
        raise DecodeError("frame is not a contiguous buffer")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class _Tuple:
    """A tuple's payload, unpacked later: an unpack inside ext_hook would nest one C-level
    unpack per tuple level, and a few dozen levels overflow a small thread stack."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class _Decoder:
    __slots__ = ("adopt", "budget", "count", "frames", "length", "made", "object_hook", "used")

    def __init__(
        self,
        frames: list[memoryview],
        max_container_len: int,
        budget: int,
        adopt: bool,
        object_hook: Callable[[dict[Any, Any]], object] | None = None,
    ) -> None:
        self.frames = frames
        self.adopt = adopt
        self.object_hook = object_hook  # decode_plain's; our own format has no use for one
        self.used = [False] * len(frames)
        self.made = 0  # _Tuples handed out so far
        # Ext payloads are copied once per nesting level; the budget bounds that amplification.
        self.budget = budget
        self.length = frames[0].nbytes  # nothing inside the header can be longer than it
        self.count = min(max_container_len, self.length)

    def unpack(self, data: bytes | memoryview, ext_hook: Callable[[int, bytes], object]) -> object:
        # Keywords spelled out, not **kwargs: that alone would double the cost of a small message.
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,  # bytes keys still pass; encode refuses them on the way out
            use_list=True,
            timestamp=1,  # msgpack's built-in ext -1 becomes a plain float, not a Timestamp
            ext_hook=ext_hook,
            object_hook=self.object_hook,
            max_str_len=self.length,
            max_bin_len=self.length,
            max_ext_len=self.length,
            max_array_len=self.count,
            max_map_len=self.count,
        )

    def ext_hook(self, code: int, data: bytes) -> object:
        self.budget -= len(data)
        if self.budget < 0:
            raise DecodeError("ext payloads too large")
        if code == EXT_TUPLE:
            self.made += 1
            return _Tuple(data)
        # Array and scalar payloads hold no ext, so this unpackb never recurses.
        fields = self.unpack(data, _no_ext)
        if type(fields) is not list:
            raise DecodeError(f"ext {code} payload is not a list")
        if code == EXT_ARRAY and len(fields) == 3 and type(fields[2]) is bytes:
            return array_from(fields[0], fields[1], fields[2])
        if code == EXT_BUFFER and len(fields) == 3:
            frame = self.take(fields[2])
            return array_from(fields[0], fields[1], frame, copy=frame.readonly or not self.adopt)
        if code == EXT_SCALAR and len(fields) == 2 and type(fields[1]) is bytes:
            return array_from(fields[0], [], fields[1])[()]
        raise DecodeError(f"unknown ext code {code} or bad payload")

    def expand(self, root: object) -> object:
        """``root`` with a tuple in place of each _Tuple, using the heap, not the C stack, for
        nesting: every payload is unpacked into a list, one flat unpack after another, whose
        own _Tuples are queued; then the lists become tuples, last found first, so that each
        tuple is built after the tuples inside it."""
        top = [root]
        trees: list[tuple[list[Any], int, int]] = [(top, self.made, 0)]  # (tree, _Tuples, depth)
        found: list[tuple[Any, Any, list[Any]]] = []  # (container, key, items)
        while trees:
            tree, count, depth = trees.pop()
            for container, key, placeholder in _tuples_in(tree, count):
                if depth >= MAX_DEPTH:
                    raise DecodeError(f"tuples nested deeper than {MAX_DEPTH} levels")
                before = self.made
                items = self.unpack_tuple(placeholder.payload)
                found.append((container, key, items))
                if self.made > before:
                    trees.append((items, self.made - before, depth + 1))
        for container, key, items in reversed(found):
            container[key] = tuple(items)
        return top[0]

    def unpack_tuple(self, payload: bytes) -> list[Any]:
        try:
            items = self.unpack(payload, self.ext_hook)
        except msgpack.ExtraData:
            items = None
        if type(items) is not list:
            raise DecodeError("tuple payload is not exactly one list")
        return items

    def take(self, index: object) -> memoryview:
        if type(index) is not int or not 0 < index < len(self.frames) or self.used[index]:
            raise DecodeError("bad or repeated out-of-band frame index")
        self.used[index] = True
        return self.frames[index]


def _tuples_in(tree: list[Any], count: int) -> Iterator[tuple[Any, Any, _Tuple]]:
    """(container, key, _Tuple) for the ``count`` _Tuples among the lists and dicts of
    ``tree``, walked with a list for a stack since one unpack may nest them 1024 deep."""
    containers: list[Any] = [tree]
    while count:
        container = containers.pop()
        slots = container.items() if type(container) is dict else enumerate(container)
        for key, value in slots:
            kind = type(value)
            if kind is _Tuple:
                yield container, key, value
                count -= 1
                if not count:
                    return
            elif kind is list or kind is dict:
                containers.append(value)


def _no_ext(code: int, data: bytes) -> object:
    raise DecodeError(f"ext {code} inside an array payload")


def _no_plain_ext(code: int, data: bytes) -> object:
    raise DecodeError(f"ext type {code} in a plain msgpack message")


def array_from(
    dtype_name: object, shape: object, buf: bytes | memoryview, copy: bool = True
) -> np.ndarray[Any, Any]:
    """The array a sender described, checked before numpy sees anything: ``dtype_name`` a
    str naming a bool/int/uint/float/complex dtype (``'<f4'``), ``shape`` a list of at most
    64 non-negative ints whose product times the itemsize is ``len(buf)``; a writeable copy
    of ``buf`` unless ``copy`` is false and it can be a view. ``DecodeError`` otherwise."""
    dtype = _dtype(dtype_name)
    if type(shape) is not list or len(shape) > _MAX_NDIM:
        raise DecodeError("array shape is not a list of at most 64 dims")
    if not all(type(dim) is int and dim >= 0 for dim in shape):
        raise DecodeError("array shape holds a negative or non-int dim")
    if math.prod(shape) * dtype.itemsize != len(buf):  # Python ints: no overflow
        raise DecodeError(f"array {dtype}{shape} does not match its {len(buf)} bytes")
    arr = np.frombuffer(buf, dtype).reshape(shape)
    if copy or not arr.flags.aligned:
        return arr.copy()  # the one copy: writeable, own data
    # An adopted frame: the ~1 MB copy of a camera frame cost a worker more (page faults
    # on fresh memory, then the memcpy) than all the rest of its work on the item.
    return arr


def _dtype(name: object) -> np.dtype[Any]:
    if type(name) is not str or not _DTYPE_NAME.fullmatch(name):
        raise DecodeError(f"unsupported dtype {_show(name)}")
    return _parse_dtype(name)


@functools.lru_cache(maxsize=128)
def _parse_dtype(name: str) -> np.dtype[Any]:
    try:
        dtype = np.dtype(name)
    except Exception as e:  # TypeError for 'f3', but np.dtype may raise anything
        raise DecodeError(f"unsupported dtype {name!r}") from e
    if dtype.kind not in _KINDS or dtype.itemsize <= 0 or dtype.fields or dtype.shape != ():
        raise DecodeError(f"unsupported dtype {name!r}")
    return dtype
