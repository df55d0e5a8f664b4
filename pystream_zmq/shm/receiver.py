"""A receiver's side of the pools: the buffer an array is built on (``Views.view``).

A descriptor comes from a socket, so it is checked as hostile: a known pool, an entry of
its table, a generation the sender has published for that entry, and the very offset and
length the sender wrote there, inside the data area. Anything else raises ``DecodeError``,
and nothing is read. Any pool of the run is known: a region may come from further up than
the process just upstream, passed on without a copy by the stages in between
(``shm.handoff``).

Each array gets a fresh owner of its own, a ctypes array on the mapping: numpy keeps it as
the array's base (views of the array, slices, reshapes, all keep it alive), and when the
last of them is gone its finalizer releases the lease. (A memoryview would not do: numpy
takes its own view of the buffer, and the memoryview dies at once.) ``Views.held`` finds
the lease of a live owner, for ``shm.handoff``, which may give the lease to the next
receiver instead (``pass_on``): then this process no longer releases it.
"""

from __future__ import annotations

import ctypes
import time
import weakref

from pystream_zmq.errors import DecodeError
from pystream_zmq.shm.layout import Pool

Owner = ctypes.Array[ctypes.c_char]


class Lease:
    """A region this process holds: where it is, and the finalizer that releases it."""

    __slots__ = ("entry", "finalizer", "gen", "length", "number", "offset", "pool")

    def __init__(self, pool: Pool, number: int, entry: int, gen: int, offset: int, length: int):
        self.pool, self.number, self.entry, self.gen = pool, number, entry, gen
        self.offset, self.length = offset, length
        self.finalizer: weakref.finalize[..., Owner] | None = None

    def owned_by(self, owner: object) -> bool:
        """Whether ``owner`` is the live object whose death releases this lease."""
        finalizer = self.finalizer
        found = finalizer.peek() if finalizer is not None else None
        return found is not None and found[0] is owner


class Views:
    """The pools this process may receive from: {pool number: its mapping}."""

    def __init__(self, pools: dict[int, Pool]) -> None:
        self.pools = pools
        # {id(owner): its lease} for every live owner whose lease this process will release;
        # an entry goes when its owner dies (its finalizer) or its lease is passed on.
        self.held: dict[int, Lease] = {}

    def view(
        self, number: object, entry: object, gen: object, offset: object, length: int
    ) -> Owner:
        """The region a descriptor names, taken by this process until the returned owner
        (and every array built on it) is gone."""
        if type(number) is not int or type(entry) is not int:
            raise DecodeError("shared-memory descriptor: pool and entry must be ints")
        if type(gen) is not int or type(offset) is not int:
            raise DecodeError("shared-memory descriptor: generation and offset must be ints")
        pool = self.pools.get(number)
        if pool is None:
            raise DecodeError(f"shared-memory descriptor names pool {number}, not one of this run")
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
        self._arm(owner, Lease(pool, number, entry, gen, offset, length))
        return owner

    def pass_on(self, lease: Lease, owner: Owner) -> None:
        """Give ``lease`` (``owner``'s) to whoever receives the item next: this process
        will not release it (its finalizer is disarmed), and it is marked in flight
        (``Pool.pass_on``). The caller has made sure nothing here will use the region
        again, but to send it."""
        if self.held.get(id(owner)) is lease:
            del self.held[id(owner)]
        if lease.finalizer is not None:
            lease.finalizer.detach()
            lease.finalizer = None
        lease.pool.pass_on(lease.entry, lease.gen, time.time())

    def take_back(self, lease: Lease, owner: Owner) -> None:
        """Undo ``pass_on`` for an item that was not sent after all (nobody else saw the
        descriptor): this process holds the lease again, as when it received it."""
        lease.pool.take(lease.entry, lease.gen)
        self._arm(owner, lease)

    def _arm(self, owner: Owner, lease: Lease) -> None:
        key = id(owner)
        # Not a bound method: it would keep this Views alive.
        finalizer = weakref.finalize(owner, _let_go, self.held, key, lease)
        finalizer.atexit = False  # the process is going: its mapping and leases with it
        lease.finalizer = finalizer
        self.held[key] = lease


def _let_go(held: dict[int, Lease], key: int, lease: Lease) -> None:
    """The last view of a region is gone: release its lease (run by its finalizer, before
    the owner's id can be another object's)."""
    if held.get(key) is lease:
        del held[key]
    lease.pool.release(lease.entry, lease.gen)
