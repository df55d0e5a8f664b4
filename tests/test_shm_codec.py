"""A shared-memory descriptor comes from a socket: a malformed or hostile one raises the
codec's DecodeError, and nothing outside its region is ever read."""

from __future__ import annotations

import random
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest

from pystream_zmq.errors import DecodeError
from pystream_zmq.shm import layout
from pystream_zmq.shm.pools import Shared, close_pools, create_pools
from pystream_zmq.wire import codec

IMAGE = np.arange(2**18, dtype="<u4")  # 1 MiB


@pytest.fixture
def shared() -> Iterator[Shared]:
    fds = create_pools(1, 4 * 2**20)
    try:
        yield Shared(fds, sends=0, receives=[0])
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
