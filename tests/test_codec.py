"""The wire codec: round trips, zero-copy, refusals with key paths, and hostile input."""

from __future__ import annotations

import collections
import contextlib
import enum
import math
import pickle
import struct
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import hypothesis.extra.numpy as hnp
import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgpack import ExtType, packb

from pystream_zmq.errors import DecodeError, UnsupportedTypeError
from pystream_zmq.wire.codec import (
    DEFAULT_MAX_CONTAINER_LEN,
    EXT_ARRAY,
    EXT_BUFFER,
    EXT_SCALAR,
    EXT_TUPLE,
    MAX_DEPTH,
    OUT_OF_BAND_MIN_BYTES,
    decode,
    encode,
)

ROUND_TRIP = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
FUZZ = settings(
    max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?", sizes=(16, 32, 64, 128)),
    hnp.complex_number_dtypes(endianness="?", sizes=(64, 128, 256)),
)
LAYOUTS = st.sampled_from(["C", "F", "strided", "reversed", "transposed"])


# -- helpers ---------------------------------------------------------------------------


def random_array(dtype: np.dtype[Any], shape: tuple[int, ...], seed: int) -> np.ndarray[Any, Any]:
    """Random bytes of any dtype (NaN payloads included); bools kept to 0/1."""
    count = math.prod(shape) * dtype.itemsize
    raw = np.random.default_rng(seed).integers(0, 256, count, dtype=np.uint8)
    if dtype.kind == "b":
        raw %= 2
    return raw.view(dtype).reshape(shape)


def with_layout(arr: np.ndarray[Any, Any], layout: str, seed: int) -> np.ndarray[Any, Any]:
    """The same shape and dtype, laid out in memory another way."""
    if arr.ndim == 0 or layout == "C":
        return arr
    if layout == "F":
        return np.asfortranarray(arr)
    if layout == "strided":  # every other row of a taller array
        tall = random_array(arr.dtype, (2 * arr.shape[0], *arr.shape[1:]), seed)
        tall[::2] = arr
        return tall[::2]
    if layout == "reversed":
        return arr[::-1].copy()[::-1]
    return np.ascontiguousarray(arr.T).T  # transposed view of a C array


def assert_same(got: object, want: object) -> None:
    """Exact equality: same types (tuple vs list, bool vs int), dtypes, shapes and bits."""
    assert type(got) is type(want), (type(got), type(want))
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray)
        assert got.dtype.str == want.dtype.str and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    elif isinstance(want, np.generic):
        assert isinstance(got, np.generic)
        assert got.dtype.str == want.dtype.str and got.tobytes() == want.tobytes()
    elif isinstance(want, float):
        assert struct.pack("<d", got) == struct.pack("<d", want)  # NaN and -0.0 too
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for key in want:
            assert_same(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert_same(a, b)
    else:
        assert got == want


def arrays_in(obj: object) -> list[np.ndarray[Any, Any]]:
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [a for item in obj for a in arrays_in(item)]
    return []


def round_trip(obj: object) -> list[bytes | memoryview]:
    """Encode, decode from writeable copies, compare, then prove the decoded arrays are
    writeable and private: scribbling on them must leave the received frames as they were."""
    frames = encode(obj)
    received = [bytearray(f) for f in frames]  # writeable, so an aliasing array would be too
    before = [bytes(f) for f in received]
    out = decode(received)
    assert_same(out, obj)
    for arr in arrays_in(out):
        assert arr.flags.writeable
        arr.reshape(-1).view(np.uint8)[:] = 0xA5  # stages draw into their inputs
    assert [bytes(f) for f in received] == before
    return frames


# -- round trips -----------------------------------------------------------------------


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    dtype = draw(DTYPES)
    if draw(st.booleans()):
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    else:  # straddle the out-of-band threshold
        rows = draw(st.integers(1, 4))
        cols = -(-OUT_OF_BAND_MIN_BYTES // (rows * dtype.itemsize)) + draw(st.integers(-2, 2))
        shape = (rows, cols, *draw(st.lists(st.just(1), max_size=2)))
    seed = draw(st.integers(0, 2**32))
    return with_layout(random_array(dtype, shape, seed), draw(LAYOUTS), seed + 1)


@ROUND_TRIP
@given(arrays())
def test_arrays_round_trip(arr: np.ndarray[Any, Any]) -> None:
    frames = round_trip({"data": arr})
    assert len(frames) == (2 if arr.nbytes >= OUT_OF_BAND_MIN_BYTES else 1)


def scalars() -> st.SearchStrategy[object]:
    numpy_scalars = DTYPES.flatmap(lambda d: hnp.arrays(d, ())).map(lambda a: a[()])
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=8),
        st.binary(max_size=8),
        numpy_scalars,
    )


def trees() -> st.SearchStrategy[object]:
    leaves = st.one_of(scalars(), arrays())
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.lists(children, max_size=4).map(tuple),
            st.dictionaries(st.text(max_size=6), children, max_size=4),
        ),
        max_leaves=10,
    )


@ROUND_TRIP
@given(trees())
def test_nested_round_trip(tree: object) -> None:
    round_trip(tree)


def test_byte_order_and_values_are_kept() -> None:
    arr = np.arange(24, dtype=">f4").reshape(2, 3, 4)[:, ::2]
    got = decode(encode({"a": arr}))["a"]  # type: ignore[index]
    assert got.dtype.str == ">f4" and got.shape == (2, 2, 4)
    assert got.tolist() == arr.tolist()


def test_types_that_msgpack_would_blur() -> None:
    obj = {"t": (1, [2, (3,)]), "l": [True, 1, 0, False], "e": (), "n": None, "b": b"\x00"}
    got = decode(encode(obj))
    assert_same(got, obj)
    assert got["l"][0] is True and got["l"][1] == 1 and type(got["l"][1]) is int  # type: ignore[index]


def test_int_range_edges_and_numpy_scalars() -> None:
    obj = [-(2**63), 2**64 - 1, np.float32(1.5), np.int64(-7), np.bool_(True), np.complex128(1j)]
    got = decode(encode(obj))
    assert_same(got, obj)
    assert type(got[4]) is np.bool_  # type: ignore[index]


def test_zero_d_and_empty_arrays() -> None:
    obj = {"0d": np.array(3.5, ">f8"), "empty": np.zeros((0, 3), "<i2"), "e3": np.zeros((2, 0, 2))}
    got = decode(encode(obj))
    assert_same(got, obj)
    assert got["0d"].ndim == 0 and got["0d"].flags.writeable  # type: ignore[index]


def test_big_array_goes_out_of_band_without_a_copy() -> None:
    image = np.zeros((480, 720, 3), np.uint8)
    frames = encode({"data": image})
    assert len(frames) == 2
    assert isinstance(frames[1], memoryview) and frames[1].nbytes == image.nbytes
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), image)
    assert len(frames[0]) < 100  # the header holds no pixels


def test_non_contiguous_big_array_is_sent_in_c_order() -> None:
    base = np.arange(600 * 400, dtype="<i4").reshape(600, 400)
    frames = encode({"data": base.T})
    assert bytes(frames[1]) == np.ascontiguousarray(base.T).tobytes()
    assert_same(decode(frames)["data"], np.ascontiguousarray(base.T))  # type: ignore[index]


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "zmq.Frame"])
def test_decode_accepts_any_buffer(kind: str) -> None:
    obj = {"data": np.arange(70_000, dtype=np.uint16), "small": np.eye(2), "x": (1, "y")}
    wraps: dict[str, Callable[[Any], Any]] = {
        "bytes": bytes,
        "bytearray": bytearray,
        "memoryview": lambda f: memoryview(bytes(f)),
        "zmq.Frame": lambda f: zmq.Frame(bytes(f)),
    }
    got = decode([wraps[kind](f) for f in encode(obj)])
    assert_same(got, obj)
    got["data"][0] = 7  # type: ignore[index]


def test_adopted_frames_become_the_arrays() -> None:
    """adopt: a writeable received frame is the out-of-band array's memory (no copy); the
    small inline array and read-only frames are still copied."""
    obj = {"data": np.arange(70_000, dtype=np.uint16), "small": np.eye(2)}
    frames = [zmq.Frame(bytes(f)) for f in encode(obj)]
    got = decode(frames, adopt=True)
    assert_same(got, obj)
    data = got["data"]  # type: ignore[index]
    assert data.flags.writeable and np.shares_memory(data, np.frombuffer(frames[1], np.uint8))
    data[0] = 7
    assert np.frombuffer(frames[1], np.uint16)[0] == 7
    del frames
    assert data[0] == 7  # the array keeps its frame alive
    read_only = decode([bytes(f) for f in encode(obj)], adopt=True)
    assert read_only["data"].flags.writeable  # type: ignore[index]
    # Without adopt, a writeable zmq.Frame is copied, as any other buffer.
    frame = zmq.Frame(bytes(encode(obj)[1]))
    copied = decode([encode(obj)[0], frame])["data"]  # type: ignore[index]
    assert not np.shares_memory(copied, np.frombuffer(frame, np.uint8))


class Point(NamedTuple):
    x: int
    y: int


class Color(enum.IntEnum):
    RED = 1


def test_subclasses_are_sent_as_their_base_type() -> None:
    obj = {
        "od": collections.OrderedDict(a=1),
        "dd": collections.defaultdict(list, b=[1]),
        "nt": Point(1, 2),
        "enum": Color.RED,
    }
    got = decode(encode(obj))
    assert_same(got, {"od": {"a": 1}, "dd": {"b": [1]}, "nt": (1, 2), "enum": 1})


def test_nesting_up_to_max_depth() -> None:
    tuples: object = np.arange(3)
    dicts: object = 1
    for _ in range(MAX_DEPTH):
        tuples, dicts = (tuples,), {"k": dicts}
    assert_same(decode(encode(tuples)), tuples)
    assert_same(decode(encode(dicts)), dicts)
    with pytest.raises(UnsupportedTypeError, match=rf"^data(\[0\]){{{MAX_DEPTH}}}: nested deeper"):
        encode([tuples])
    with pytest.raises(UnsupportedTypeError, match=f"nested deeper than {MAX_DEPTH} levels"):
        encode({"k": dicts})


def test_deep_tuples_decode_on_a_small_thread_stack() -> None:
    """unpackb keeps its parse stack on the C stack; nesting it per tuple crashed at ~8 levels
    on a 256 KB thread stack. A segfault here would take the whole test run down."""
    ok: object = np.arange(3)
    for _ in range(MAX_DEPTH):
        ok = (ok,)
    frames = encode(ok)
    hostile = packb(0)
    for _ in range(5 * MAX_DEPTH):
        hostile = packb(ExtType(EXT_TUPLE, packb([ExtType(EXT_TUPLE, hostile)])))
    results: list[object] = []

    def run() -> None:
        results.append(decode(frames))
        try:
            decode([hostile])
        except DecodeError as e:
            results.append(e)

    old = threading.stack_size(256 * 1024)
    try:
        worker = threading.Thread(target=run)
        worker.start()
    finally:
        threading.stack_size(old)
    worker.join(timeout=30)
    assert len(results) == 2
    assert_same(results[0], ok)
    assert isinstance(results[1], DecodeError)


def on_a_thread(stack_size: int, run: Callable[[], object]) -> object:
    """What ``run()`` returns, run on a new thread with a stack of ``stack_size`` bytes."""
    results: list[object] = []
    old = threading.stack_size(stack_size)
    try:
        worker = threading.Thread(target=lambda: results.append(run()))
        worker.start()
    finally:
        threading.stack_size(old)
    worker.join(timeout=30)
    assert len(results) == 1
    return results[0]


def tuples_around(inner: object, levels: int) -> bytes:
    """A header of ``levels`` tuples, each the one item of the next, around ``inner``; unlike
    encode, it goes deeper than MAX_DEPTH when asked to."""
    for _ in range(levels):
        inner = ExtType(EXT_TUPLE, packb([inner]))
    return packb(inner)


# Any decode holds two msgpack parse contexts of ~40 KB each on the C stack (an inline array's
# payload is unpacked inside the header's unpack), so below ~96 KB even a flat message with a
# small array overflows. What must not add to that is the depth of the message.
SMALL_STACK = 128 * 1024


def test_a_deeper_message_needs_no_more_stack() -> None:
    """Tuple payloads are unpacked one after another, never one inside another, so the deepest
    messages decode, or are refused, on the stack that a flat one needs."""
    flat = {"a": np.eye(2), "t": (1, 2)}
    deepest: object = np.arange(3)
    for level in range(MAX_DEPTH // 3):  # encode counts every container towards MAX_DEPTH
        deepest = ({"level": [level, deepest]},)
    frames = [encode(flat), encode(deepest)]
    lists = b"\x91" * 1000 + b"\xc0"  # lists nested nearly as deep as msgpack's own limit
    deepest_allowed: object = 0
    for _ in range(MAX_DEPTH):
        deepest_allowed = (deepest_allowed,)
    too_deep = [tuples_around(0, levels) for levels in (MAX_DEPTH + 1, 50 * MAX_DEPTH)]

    def run() -> list[object]:
        got = [decode(frames[0]), decode(frames[1]), decode([lists])]
        got.append(decode([tuples_around(0, MAX_DEPTH)]))
        for header in too_deep:
            try:
                decode([header])
            except DecodeError as e:
                got.append(e)
        return got

    got = on_a_thread(SMALL_STACK, run)
    assert isinstance(got, list) and len(got) == 6
    assert_same(got[0], flat)
    assert_same(got[1], deepest)
    node, levels = got[2], 0
    while type(node) is list and len(node) == 1:  # too deep for a recursive comparison
        node, levels = node[0], levels + 1
    assert (node, levels) == (None, 1000)
    assert_same(got[3], deepest_allowed)
    for error in got[4:]:
        assert f"tuples nested deeper than {MAX_DEPTH} levels" in str(error)


# -- refusals on encode ----------------------------------------------------------------


class MyBox:
    pass


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"meta": {"box": MyBox()}}, "data['meta']['box']: cannot send a MyBox"),
        ({"items": [0, 1, 2, {1, 2}]}, "data['items'][3]: cannot send a set"),
        ({"a": (1, [MyBox()])}, "data['a'][1][0]: cannot send a MyBox"),
        ({1}, "data: cannot send a set"),
        ({"b": bytearray(b"x")}, "data['b']: cannot send a bytearray"),
        ({"boxes": {0: 1}}, "data['boxes']: dict key 0 is a int; only str keys can be sent"),
        ({"n": [2**64]}, "data['n'][0]: int of 65 bits is outside the 64-bit range"),
        ({"n": -(2**63) - 1}, "data['n']: int of 64 bits is outside the 64-bit range"),
        ({"o": np.array([1, None])}, "data['o']: cannot send a numpy array of dtype object"),
        ({"s": np.array(["ab"])}, "data['s']: cannot send a numpy array of dtype <U2"),
        ({"s": np.array([b"ab"])}, "data['s']: cannot send a numpy array of dtype |S2"),
        ({"t": np.array(["2024-01-01"], "M8[D]")}, "data['t']: cannot send a numpy array of"),
        ({"v": np.zeros(2, "i4,f4")}, "data['v']: cannot send a numpy array of dtype"),
        ({"u": np.str_("x")}, "data['u']: cannot send a numpy str_"),
        ({"m": np.ma.masked_array([1, 2])}, "data['m']: cannot send a MaskedArray"),
    ],
)
def test_unsupported_types_name_the_key_path(obj: object, message: str) -> None:
    with pytest.raises(UnsupportedTypeError) as info:
        encode(obj)
    assert str(info.value).startswith(message), str(info.value)
    assert isinstance(info.value, TypeError)


# -- hostile input on decode -----------------------------------------------------------

VALID_MESSAGES = [
    encode({"a": 1, "b": 2.0, "c": "x"}),
    encode({"img": np.arange(70_000, dtype=np.uint8), "t": (1, np.float32(2)), "s": np.eye(2)}),
    encode([np.zeros(20_000, ">f4"), (np.zeros(17_000, "<i4"), {"k": [None, True, b"z"]})]),
]


def mutate(frames: list[bytes], data: st.DataObject) -> list[bytes]:
    frames = list(frames)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate", "drop", "add"]))
        if not frames or op == "add":
            at = data.draw(st.integers(0, len(frames)))
            frames.insert(at, data.draw(st.binary(max_size=64)))
            continue
        i = data.draw(st.integers(0, len(frames) - 1))
        frame = frames[i]
        pos = data.draw(st.integers(0, len(frame)))
        if op == "flip" and frame:
            pos = min(pos, len(frame) - 1)
            frame = (
                frame[:pos]
                + bytes([frame[pos] ^ data.draw(st.integers(1, 255))])
                + frame[pos + 1 :]
            )
        elif op == "insert":
            frame = frame[:pos] + data.draw(st.binary(min_size=1, max_size=8)) + frame[pos:]
        elif op == "delete":
            frame = frame[:pos] + frame[pos + data.draw(st.integers(1, 8)) :]
        elif op == "truncate":
            frame = frame[:pos]
        elif op == "drop":
            del frames[i]
            continue
        frames[i] = frame
    return frames


@FUZZ
@given(st.sampled_from(VALID_MESSAGES), st.data())
def test_mutated_messages_raise_only_decode_error(frames: list[Any], data: st.DataObject) -> None:
    mutated = mutate([bytes(f) for f in frames], data)
    try:
        out = decode(mutated)
    except DecodeError:
        return
    for arr in arrays_in(out):
        assert arr.flags.writeable


@ROUND_TRIP
@given(st.lists(st.binary(max_size=200), max_size=3))
def test_random_bytes_raise_only_decode_error(frames: list[bytes]) -> None:
    with contextlib.suppress(DecodeError):
        decode(frames)


def ext(code: int, *fields: object) -> ExtType:
    return ExtType(code, packb(list(fields)))


NILS_OVER_LIMIT = b"\xdd" + (DEFAULT_MAX_CONTAINER_LEN + 1).to_bytes(4, "big")


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([], "empty"),
        ([b""], "incomplete"),
        ([pickle.dumps({"a": 1})], "malformed"),
        ([packb({"a": ext(EXT_ARRAY, "|O", [1], b"\0" * 8)})], "dtype '|O'"),
        ([packb({"a": ext(EXT_ARRAY, "O", [1], b"\0" * 8)})], "dtype 'O'"),
        ([packb(ext(EXT_ARRAY, "S", [-1], b"abc"))], "dtype 'S'"),
        ([packb(ext(EXT_ARRAY, "(", [1], b"\0"))], "dtype"),
        ([packb(ext(EXT_ARRAY, "i4,(", [1], b"\0"))], "dtype"),
        ([packb(ext(EXT_ARRAY, "f3", [1], b"\0\0\0"))], "dtype 'f3'"),
        ([packb(ext(EXT_ARRAY, "M8", [1], b"\0" * 8))], "dtype"),
        ([packb(ext(EXT_ARRAY, "[('a', '<i4')]", [1], b"\0" * 4))], "dtype"),
        ([packb(ext(EXT_ARRAY, 5, [1], b"\0"))], "dtype"),
        ([packb(ext(EXT_ARRAY, "<i4", [-1], b""))], "negative"),
        ([packb(ext(EXT_ARRAY, "<i4", [True], b"\0" * 4))], "non-int"),
        ([packb(ext(EXT_ARRAY, "<i4", [1.0], b"\0" * 4))], "non-int"),
        ([packb(ext(EXT_ARRAY, "<i4", 4, b"\0" * 4))], "shape"),
        ([packb(ext(EXT_ARRAY, "<i4", [1] * 65, b"\0" * 4))], "shape"),
        ([packb(ext(EXT_ARRAY, "<i4", [2**62, 2**62], b""))], "does not match"),
        ([packb(ext(EXT_ARRAY, "<i4", [0, 2**62, 2**62], b""))], "malformed"),
        ([packb(ext(EXT_ARRAY, "<i4", [3], b"\0" * 8))], "does not match"),
        ([packb(ext(EXT_ARRAY, "<i4", [1]))], "bad payload"),
        ([packb(ext(EXT_SCALAR, "<f8", b"\0" * 4))], "does not match"),
        ([packb(ext(EXT_SCALAR, "<U1", b"\0" * 4))], "dtype"),
        ([packb(ExtType(EXT_TUPLE, packb(1)))], "tuple payload"),
        ([packb(ExtType(EXT_TUPLE, packb([1]) + b"\xc0"))], "tuple payload"),
        ([packb(ExtType(EXT_ARRAY, b"\xc1"))], "malformed"),
        ([packb(ExtType(EXT_ARRAY, packb(["<i4", [1], ExtType(EXT_TUPLE, b"\x90")])))], "ext"),
        ([packb(ExtType(42, packb([])))], "unknown ext"),
        ([b"\xdd\x80\x00\x00\x00" + b"\xc0" * 16], "max_array_len"),  # claims 2**31 items
        ([NILS_OVER_LIMIT + b"\xc0" * (DEFAULT_MAX_CONTAINER_LEN + 1)], "max_array_len"),
        ([NILS_OVER_LIMIT + b"\x80" * (DEFAULT_MAX_CONTAINER_LEN + 1)], "max_array_len"),
        ([b"\x91" * 5000 + b"\xc0"], "StackError"),  # msgpack's own nesting limit
        ([packb({1: 2})], "map key"),
        ([b"\xa2\xff\xfe"], "UnicodeDecodeError"),
        ([packb(ext(EXT_BUFFER, "<u1", [4], 2)), b"abcd"], "frame index"),
        ([packb(ext(EXT_BUFFER, "<u1", [4], 0)), b"abcd"], "frame index"),
        ([packb(ext(EXT_BUFFER, "<u1", [4], True)), b"abcd"], "frame index"),
        ([packb(ext(EXT_BUFFER, "<u1", [4], "1")), b"abcd"], "frame index"),
        ([packb([ext(EXT_BUFFER, "<u1", [4], 1)] * 2), b"abcd"], "frame index"),
        ([packb(ext(EXT_BUFFER, "<u1", [5], 1)), b"abcd"], "does not match"),
        ([packb({"a": 1}), b"extra"], "not referenced"),
        ([packb(1), np.zeros((4, 4), np.uint8)[:, 0].data], "contiguous"),
        (["text"], "TypeError"),
        (None, "TypeError"),
    ],
)
def test_hostile_frames_raise_decode_error(frames: Any, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode(frames)


def test_limits_are_exact() -> None:
    frames = encode({"data": np.zeros(100_000, np.uint8), "l": list(range(10))})
    total = sum(len(f) for f in frames)
    assert_same(decode(frames, max_message_bytes=total)["data"], np.zeros(100_000, np.uint8))  # type: ignore[index]
    with pytest.raises(DecodeError, match="over the"):
        decode(frames, max_message_bytes=total - 1)
    assert decode(frames, max_container_len=10)["l"] == list(range(10))  # type: ignore[index]
    with pytest.raises(DecodeError, match="max_array_len"):
        decode(frames, max_container_len=9)


def test_msgpack_timestamp_ext_decodes_to_a_plain_float() -> None:
    assert decode([packb(msgpack.Timestamp(1, 500_000_000))]) == 1.5
