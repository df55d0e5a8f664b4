"""A shared-memory descriptor comes from a socket: a malformed or hostile one raises the
codec's DecodeError, and nothing outside its region is ever read."""

from __future__ import annotations

import collections
import os
import random
import weakref
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest

from pystream_zmq.errors import DecodeError, UnsupportedTypeError
from pystream_zmq.shm import layout
from pystream_zmq.shm.handoff import Handoff
from pystream_zmq.shm.pools import Shared, close_pools, create_pools
from pystream_zmq.wire import codec

IMAGE = np.arange(2**18, dtype="<u4")  # 1 MiB


@pytest.fixture
def shared() -> Iterator[Shared]:
    fds = create_pools(1, 4 * 2**20)
    try:
        yield Shared(fds, sends=0)
    finally:
        close_pools(fds)


def header(fields: list[object]) -> bytes:
    return msgpack.packb({"a": msgpack.ExtType(codec.EXT_SHARED, msgpack.packb(fields))})


def placed(shared: Shared) -> list[object]:
    """The descriptor fields of IMAGE, placed in the pool: [dtype, shape, pool, entry,
    generation, offset]."""
    assert shared.allocator is not None
    frames, _ = codec.encode_shared({"a": IMAGE}, shared.allocator)
    ext = msgpack.unpackb(frames[0])["a"]
    fields: list[object] = msgpack.unpackb(ext.data)
    return fields


def test_a_valid_descriptor_decodes_to_a_writeable_view(shared: Shared) -> None:
    out = codec.decode([header(placed(shared))], shared=shared.views)
    assert np.array_equal(out["a"], IMAGE) and out["a"].flags.writeable


def test_without_shared_memory_a_descriptor_is_malformed(shared: Shared) -> None:
    with pytest.raises(DecodeError, match="without shared memory"):
        codec.decode([header(placed(shared))])


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (2, 1), (2, -1), (2, "0"), (2, None),  # pool: unknown, or not an int
        (3, -1), (3, layout.ENTRIES), (3, 2**63), (3, 1.0), (3, True),  # entry
        (4, 0), (4, 2), (4, -5), (4, 2**64 - 1), (4, "1"),  # generation: stale or never sent
        (5, -4096), (5, 4096), (5, 4 * 2**20), (5, 2**63), (5, None),  # offset
        (0, "|O"), (0, "<f4x"), (1, [2**18 + 1]), (1, [2**40]), (1, [-1]), (1, "1"),  # array
    ],
)  # fmt: skip
def test_a_hostile_descriptor_raises_decode_error(
    shared: Shared, index: int, value: object
) -> None:
    fields = placed(shared)
    fields[index] = value
    with pytest.raises(DecodeError):
        codec.decode([header(fields)], shared=shared.views)


@pytest.mark.parametrize("count", [5, 7])
def test_a_descriptor_of_another_length_raises_decode_error(shared: Shared, count: int) -> None:
    fields = placed(shared)
    fields = [*fields, 0][:count]
    with pytest.raises(DecodeError):
        codec.decode([header(fields)], shared=shared.views)


def test_a_region_reused_by_its_sender_is_refused_not_read(shared: Shared) -> None:
    fields = placed(shared)
    assert shared.allocator is not None
    shared.allocator.cancel([fields[3]])  # type: ignore[list-item]
    shared.allocator.place(IMAGE)  # the same entry, a new generation
    with pytest.raises(DecodeError, match="generation"):
        codec.decode([header(fields)], shared=shared.views)


def test_random_descriptors_raise_only_decode_error(shared: Shared) -> None:
    rng = random.Random(16)
    valid = placed(shared)
    ints = [0, 1, -1, 2**31, 2**63 - 1, -(2**63), 4096, layout.ENTRIES, 4 * 2**20]
    decoded = 0
    for _ in range(3000):
        fields = list(valid)
        for index in rng.sample(range(2, 6), rng.randint(1, 4)):
            fields[index] = rng.choice([*ints, rng.randint(-(2**40), 2**40), None, "x", 1.5])
        try:
            out = codec.decode([header(fields)], shared=shared.views)
        except DecodeError:
            continue
        assert np.array_equal(out["a"], IMAGE)  # only the real descriptor can pass
        decoded += 1
    assert decoded < 3000


# -- passing a received region on (shm.handoff) ----------------------------------------------
@pytest.fixture
def run() -> Iterator[tuple[Shared, Shared, Shared]]:
    """The pools of a run of two processes: (source, middle, sink), each as it maps them."""
    fds = create_pools(3, 8 * 2**20)
    try:
        yield (
            Shared(fds, sends=0),
            Shared(fds, sends=1),
            Shared(fds, sends=2),
        )
    finally:
        close_pools(fds)


def test_a_descriptor_of_any_pool_of_the_run_is_read_and_no_other(
    run: tuple[Shared, Shared, Shared],
) -> None:
    source, _, sink = run
    assert source.allocator is not None
    frames, _ = codec.encode_shared({"a": IMAGE}, source.allocator)
    out = codec.decode(frames, shared=sink.views)  # pool 0, two hops up
    assert np.array_equal(out["a"], IMAGE)
    fields = msgpack.unpackb(msgpack.unpackb(frames[0])["a"].data)
    fields[2] = 3  # no such pool in this run
    with pytest.raises(DecodeError, match="pool 3"):
        codec.decode([header(fields)], shared=sink.views)


def _through_the_middle(run: tuple[Shared, Shared, Shared], make: Any) -> tuple[Any, Handoff]:
    """Receive IMAGE in the middle process, let ``make(item)`` build its output (and keep
    what it likes), encode it as a worker does: (what the sink decodes, the Handoff)."""
    source, middle, sink = run
    assert source.allocator is not None and middle.allocator is not None
    frames, _ = codec.encode_shared({"a": IMAGE.copy()}, source.allocator)
    handoff = Handoff(middle.allocator, middle.views)
    box = [codec.decode(frames, shared=middle.views)]
    box.append(make(box.pop()))
    handoff.prepare(box)
    out = box.pop()
    try:
        frames, _ = codec.encode_shared(out, handoff)
    finally:
        handoff.done()
    del out
    return codec.decode(frames, shared=sink.views), handoff


KEPT: list[object] = []


@pytest.mark.parametrize(
    ("make", "passed"),
    [
        (lambda d: d, 1),
        (lambda d: {"x": [(1, d["a"])]}, 1),  # nested anew
        (lambda d: {"a": d["a"].reshape(512, -1).view("<f4")}, 1),  # the whole region
        (lambda d: KEPT.append(d["a"]) or d, 0),  # the array kept
        (lambda d: KEPT.append(d["a"][1:]) or d, 0),  # a slice kept
        (lambda d: KEPT.append(d["a"].reshape(-1)) or d, 0),  # a view kept
        (lambda d: KEPT.append(d) or dict(d), 0),  # its dict kept, a copy goes on
        (lambda d: KEPT.append(d) or d, 0),  # the item itself kept
        (lambda d: KEPT.append(memoryview(d["a"])) or d, 0),
        (lambda d: KEPT.append(d["a"].base.base) or d, 0),  # its owner
        (lambda d: KEPT.append(weakref.ref(d["a"])) or d, 0),
        (lambda d: {"a": d["a"], "b": d["a"]}, 0),  # twice in the item
        (lambda d: {"a": d["a"][: 2**17]}, 0),  # part of the region
        (lambda d: {"a": d["a"][::2]}, 0),  # not contiguous
        (lambda d: collections.OrderedDict(d), 0),  # a subclass: not looked into
    ],
)  # fmt: skip
def test_only_what_nothing_else_holds_is_passed_on(
    run: tuple[Shared, Shared, Shared], make: Any, passed: int
) -> None:
    try:
        out, handoff = _through_the_middle(run, make)
        assert handoff.counters["shm_passed"] == passed, handoff.counters
        # Read from forward()'s pool (passed on), or from the middle's (copied).
        pools = {lease.number for lease in run[2].views.held.values()}
        assert pools == ({0} if passed else {1})
        expected = [v for v in _leaves(make({"a": _like_decoded()})) if isinstance(v, np.ndarray)]
        arrays = [v for v in _leaves(out) if isinstance(v, np.ndarray)]
        assert len(arrays) == len(expected) and all(
            a.dtype == e.dtype and np.array_equal(a, e)
            for a, e in zip(arrays, expected, strict=True)
        )
        if passed:  # the middle holds nothing of it any more
            assert not run[1].views.held
    finally:
        KEPT.clear()


def _like_decoded() -> np.ndarray[Any, Any]:
    """IMAGE, on a base under a base, as decode builds it."""
    return np.frombuffer(bytearray(IMAGE.tobytes()), IMAGE.dtype).reshape(IMAGE.shape)


def _leaves(obj: object) -> Iterator[object]:
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _leaves(item)
    else:
        yield obj


def test_an_item_that_fails_to_encode_holds_its_leases_again(
    run: tuple[Shared, Shared, Shared],
) -> None:
    source, middle, _ = run
    assert source.allocator is not None and middle.allocator is not None
    frames, _ = codec.encode_shared({"a": IMAGE}, source.allocator)
    handoff = Handoff(middle.allocator, middle.views)
    box = [codec.decode(frames, shared=middle.views)]
    box[0]["z"] = {1}  # after "a": refused once "a" is passed on
    handoff.prepare(box)
    out = box.pop()
    with pytest.raises(UnsupportedTypeError):
        codec.encode_shared(out, handoff)
    handoff.done()
    assert handoff.counters["shm_passed"] == handoff.counters["shm_arrays"] == 0
    assert len(middle.views.held) == 1 and source.allocator.pool.claim(0)[0] == os.getpid()
    assert source.allocator.in_use() == 1
    del out  # the middle lets it go: released as any lease it holds
    assert not middle.views.held and source.allocator.in_use() == 0
