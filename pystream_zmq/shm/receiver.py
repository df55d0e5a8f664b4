"""A receiver's side of the pools: the buffer an array is built on (``Views.view``).

A descriptor comes from a socket, so it is checked as hostile: a known pool, an entry of
its table, a generation the sender has published for that entry, and the very offset and
length the sender wrote there, inside the data area. Anything else raises ``DecodeError``,
and nothing is read.

Each array gets a fresh owner of its own, a ctypes array on the mapping: numpy keeps it as
the array's base (views of the array, slices, reshapes, all keep it alive), and when the
last of them is gone its finalizer releases the lease. (A memoryview would not do: numpy
takes its own view of the buffer, and the memoryview dies at once.)
"""

from __future__ import annotations

import ctypes
import weakref

from pystream_zmq.errors import DecodeError
from pystream_zmq.shm.layout import Pool


class Views:
    """The pools this process may receive from: {pool number: its mapping}."""

    def __init__(self, pools: dict[int, Pool]) -> None:
        self.pools = pools

    def view(
        self, number: object, entry: object, gen: object, offset: object, length: int
    ) -> ctypes.Array[ctypes.c_char]:
        """The region a descriptor names, taken by this process until the returned owner
        (and every array built on it) is gone."""
        if type(number) is not int or type(entry) is not int:
            raise DecodeError("shared-memory descriptor: pool and entry must be ints")
        if type(gen) is not int or type(offset) is not int:
            raise DecodeError("shared-memory descriptor: generation and offset must be ints")
        pool = self.pools.get(number)
        if pool is None:
            raise DecodeError(f"shared-memory descriptor names pool {number}, not one of this link")
        if not 0 <= entry < pool.entries:
            raise DecodeError(f"shared-memory descriptor: no entry {entry}")
        if not (length > 0 and offset >= 0 and offset + length <= pool.data_size):
            raise DecodeError("shared-memory descriptor: region outside the pool")
        if gen <= 0 or pool.sent(entry) != gen:
            raise DecodeError("shared-memory descriptor: stale or unknown generation")
        if pool.meta(entry)[:2] != (offset, length):
            raise DecodeError("shared-memory descriptor does not match its lease")
        pool.take(entry, gen)
        if pool.sent(entry) != gen:  # taken back (an orphan) while we took it
            raise DecodeError("shared-memory descriptor: lease taken back before it was read")
        owner = (ctypes.c_char * length).from_buffer(pool.map, pool.data_at + offset)
        release = weakref.finalize(owner, pool.release, entry, gen)
        release.atexit = False  # the process is going: its mapping and leases with it
        return owner
