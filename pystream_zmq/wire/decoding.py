"""Decoding frames into a data item (``decode``), and another program's single msgpack
frame under the same checks (``decode_plain``); the format is described in ``codec.py``.
Every frame is hostile until checked."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from pystream_zmq.errors import DecodeError

if TYPE_CHECKING:
    import zmq
    from typing_extensions import Buffer

    from pystream_zmq.shm.receiver import Views

from pystream_zmq.wire.format import (
    DEFAULT_MAX_CONTAINER_LEN,
    DEFAULT_MAX_MESSAGE_BYTES,
    DTYPE_NAME,
    EXT_ARRAY,
    EXT_BUFFER,
    EXT_SCALAR,
    EXT_SHARED,
    EXT_TUPLE,
    KINDS,
    MAX_DEPTH,
    MAX_NDIM,
    show,
)


def decode(
    frames: Sequence[Buffer | zmq.Frame],
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_container_len: int = DEFAULT_MAX_CONTAINER_LEN,
    adopt: bool = False,
    shared: Views | None = None,
) -> object:
    """Rebuild the object from ``frames`` (bytes, bytearray, memoryview or zmq.Frame).

    Arrays come back writeable, each copied exactly once, never aliasing the frames, unless
    ``adopt``: the frames are the caller's to give away (zmq.Frames it has just received
    with copy=False, that nothing else references), and an out-of-band array whose frame is
    writeable and aligned is a view on it, no copy; the array keeps its frame alive.
    ``shared``: the shared-memory pools this link may name (``EXT_SHARED``); such an array
    is a writeable view on the pool, whose region is released once the array and every
    view of it are gone. Without ``shared``, a message naming a pool is malformed.
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
        decoder = _Decoder(views, max_container_len, max_message_bytes, adopt, shared=shared)
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
    __slots__ = (
        "adopt", "budget", "count", "frames", "length", "made", "object_hook", "shared", "used",
    )  # fmt: skip

    def __init__(
        self,
        frames: list[memoryview],
        max_container_len: int,
        budget: int,
        adopt: bool,
        object_hook: Callable[[dict[Any, Any]], object] | None = None,
        shared: Views | None = None,
    ) -> None:
        self.frames = frames
        self.shared = shared
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
        if code == EXT_SHARED and len(fields) == 6:
            if self.shared is None:
                raise DecodeError("a shared-memory array on a link without shared memory")
            dtype, shape, pool, entry, gen, offset = fields
            owner = self.shared.view(pool, entry, gen, offset, array_bytes(dtype, shape))
            return array_from(dtype, shape, owner, copy=False)  # type: ignore[arg-type]
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
    dims, size = _checked_shape(dtype, shape)
    if size != len(buf):
        raise DecodeError(f"array {dtype}{shape} does not match its {len(buf)} bytes")
    arr = np.frombuffer(buf, dtype).reshape(dims)
    if copy or not arr.flags.aligned:
        return arr.copy()  # the one copy: writeable, own data
    # An adopted frame: the ~1 MB copy of a camera frame cost a worker more (page faults
    # on fresh memory, then the memcpy) than all the rest of its work on the item.
    return arr


def array_bytes(dtype_name: object, shape: object) -> int:
    """The bytes of the array a sender described, its dtype and shape checked as in
    ``array_from``; ``DecodeError`` otherwise."""
    return _checked_shape(_dtype(dtype_name), shape)[1]


def _checked_shape(dtype: np.dtype[Any], shape: object) -> tuple[list[int], int]:
    """(``shape``, its bytes) once checked: a list of at most 64 non-negative ints."""
    if type(shape) is not list or len(shape) > MAX_NDIM:
        raise DecodeError("array shape is not a list of at most 64 dims")
    if not all(type(dim) is int and dim >= 0 for dim in shape):
        raise DecodeError("array shape holds a negative or non-int dim")
    return shape, math.prod(shape) * dtype.itemsize  # Python ints: no overflow


def _dtype(name: object) -> np.dtype[Any]:
    if type(name) is not str or not DTYPE_NAME.fullmatch(name):
        raise DecodeError(f"unsupported dtype {show(name)}")
    return _parse_dtype(name)


@functools.lru_cache(maxsize=128)
def _parse_dtype(name: str) -> np.dtype[Any]:
    try:
        dtype = np.dtype(name)
    except Exception as e:  # TypeError for 'f3', but np.dtype may raise anything
        raise DecodeError(f"unsupported dtype {name!r}") from e
    if dtype.kind not in KINDS or dtype.itemsize <= 0 or dtype.fields or dtype.shape != ():
        raise DecodeError(f"unsupported dtype {name!r}")
    return dtype
