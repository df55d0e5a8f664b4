"""The sender's side of a pool: it alone decides where an array goes in it (``Allocator``).

A region is reused only once its receiver has released it (``released == sent``), so an
array a stage or a user keeps, for ever if it likes, never changes; it only keeps its
region out of use. When no region is free the array goes by the frame path, counted as
``shm_full``: never a drop, never a stall, never a growing pool.

Leases that no receiver will ever release are taken back when the pool runs short: those
held by a process that has died (``kill -9`` of a receiver), and those never taken by any
receiver for ``ORPHAN_AFTER`` seconds (lost in a queue with a process that died, or let go
unread; or passed on by a receiver, counted from when it was passed). A restarted sender
rebuilds what is in use from the lease table.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
from typing import Any

import numpy as np

from pystream_zmq.shm import layout
from pystream_zmq.shm.layout import Pool

DEFAULT_MIN_BYTES = 64 * 1024  # smaller arrays go by frame (or inline); see docs/shared-memory.md
# Seconds a lease nobody took waits before it is taken back. Long: an item may wait that
# long unread behind a slow stage, and taking its region back makes it a counted drop,
# whereas a region held too long only sends a few arrays by frame.
ORPHAN_AFTER = 600.0
# forward()'s pool (see pools.Shared) has its first pages mapped in by the kernel at its
# first array, on a thread of its own: a fresh page costs a fault and a zeroing when first
# written, which made the first 300 frames of a run (about 40 MB of pages, 1 MB each, 3
# stages) run 30 % slower than the next. Not a worker's: those pages would count in its
# resident size, which ``max_memory_mb`` limits. Bounded by the pool; linux 5.14+
# (MADV_POPULATE_WRITE), else pages fault in as they are written, as before.
WARM_BYTES = 32 * 2**20
_MADV_POPULATE_WRITE = 23


class Allocator:
    """Places arrays in ``pool`` (pool number ``number``, as descriptors name it). Thread-safe:
    the orchestrator's user threads may forward() at once."""

    def __init__(
        self, pool: Pool, number: int, min_bytes: int = DEFAULT_MIN_BYTES, warm_bytes: int = 0
    ) -> None:
        self.pool = pool
        self.number = number
        self.min_bytes = min_bytes
        self._data = np.frombuffer(pool.map, np.uint8, pool.data_size, pool.data_at)
        self._lock = threading.Lock()
        self._warm_bytes = warm_bytes  # to map in at the first array; 0 once asked for
        # {entry: (offset, padded length, generation)}: handed out, not yet seen released
        self._out: dict[int, tuple[int, int, int]] = {}
        for entry in range(pool.entries):  # a restarted sender: what its predecessor left
            sent = pool.sent(entry)
            if sent != pool.released(entry):
                offset, length, _, _ = pool.meta(entry)
                self._out[entry] = (offset, _padded(length), sent)
        self._gens = [max(pool.sent(e), pool.released(e)) for e in range(pool.entries)]
        self.counters = {
            "shm_arrays": 0,  # arrays that went by shared memory
            "shm_bytes": 0,
            "frame_arrays": 0,  # arrays of OUT_OF_BAND_MIN_BYTES or more that went by frame
            "frame_bytes": 0,
            "shm_full": 0,  # of those, sent by frame because the pool had no room
            # Of shm_arrays, the received regions passed on whole without a copy (in
            # another process's pool: shm.handoff); counted by the Handoff that did it.
            "shm_passed": 0,
        }

    def place(self, arr: np.ndarray[Any, Any]) -> tuple[int, int, int, int] | None:
        """Copy ``arr`` into a free region: (pool, entry, generation, offset) for its
        descriptor, or None when it goes by frame (too small, or no room: counted)."""
        size = arr.nbytes
        counters = self.counters
        if size >= self.min_bytes:
            if self._warm_bytes:
                self._warm()
            with self._lock:
                spot = self._allocate(size)
            if spot is not None:
                entry, offset = spot
                target = self._data[offset : offset + size]
                try:
                    np.copyto(target.view(arr.dtype).reshape(arr.shape), arr, casting="no")
                except BaseException:  # the reservation goes with it
                    with self._lock:
                        del self._out[entry]
                    raise
                with self._lock:
                    gen = self._gens[entry] + 1
                    self._gens[entry] = gen
                    self._out[entry] = (offset, _padded(size), gen)
                    self.pool.publish(entry, gen, offset, size, time.time())
                counters["shm_arrays"] += 1
                counters["shm_bytes"] += size
                return self.number, entry, gen, offset
            counters["shm_full"] += 1
        counters["frame_arrays"] += 1
        counters["frame_bytes"] += size
        return None

    def _warm(self) -> None:
        pool = self.pool
        length = min(self._warm_bytes, pool.data_size) & ~(mmap.PAGESIZE - 1)
        self._warm_bytes = 0

        def populate() -> None:
            with contextlib.suppress(OSError, ValueError):  # an older kernel; a closed map
                pool.map.madvise(_MADV_POPULATE_WRITE, pool.data_at, length)

        threading.Thread(target=populate, name="pystream-shm-warm", daemon=True).start()

    def cancel(self, entries: list[int]) -> None:
        """Free regions placed for an item that was not sent after all: no receiver ever
        saw them."""
        with self._lock:
            for entry in entries:
                spot = self._out.pop(entry, None)
                if spot is not None:
                    self.pool.release(entry, spot[2])

    def in_use(self) -> int:
        """Leases handed out and not released yet (as last looked)."""
        with self._lock:
            self._collect()
            return len(self._out)

    # -- under the lock ------------------------------------------------------------------
    def _allocate(self, size: int) -> tuple[int, int] | None:
        padded = _padded(size)
        if padded > self.pool.data_size:
            return None
        self._collect()
        spot = self._find(padded)
        if spot is None and self._reclaim():
            spot = self._find(padded)
        if spot is None:
            return None
        # Reserved at once (generation to come): a concurrent place() must not take it.
        self._out[spot[0]] = (spot[1], padded, -1)
        return spot

    def _collect(self) -> None:
        """Forget the regions their receivers have released."""
        pool = self.pool
        done = [e for e, (_, _, gen) in self._out.items() if gen >= 0 and pool.released(e) == gen]
        for entry in done:
            del self._out[entry]

    def _find(self, padded: int) -> tuple[int, int] | None:
        """(free entry, lowest offset with ``padded`` free bytes): first fit, so that the
        pages in use stay few, and warm."""
        if len(self._out) >= self.pool.entries:
            return None
        entry = next(e for e in range(self.pool.entries) if e not in self._out)
        start = 0
        for offset, length, _ in sorted(self._out.values()):
            if offset - start >= padded:
                break
            start = max(start, offset + length)
        if start + padded > self.pool.data_size:
            return None
        return entry, start

    def _reclaim(self) -> bool:
        """Take back the leases no receiver will release (see the module docstring);
        whether any came back."""
        pool, now, mine = self.pool, time.time(), os.getpid()
        back = []
        for entry, (_, _, gen) in self._out.items():
            if gen < 0:
                continue
            pid, claimed = pool.claim(entry)  # first: see layout's note on ordering
            ours = claimed == gen & layout.GEN_MASK
            if ours and pid:
                if pid != mine and not _alive(pid):
                    back.append(entry)
                continue
            since = pool.meta(entry)[3]
            if ours:  # pid 0: passed on by a holder, in flight to the next one
                passed = pool.passed_time(entry)
                if passed < since:  # not seen yet (or the clock went back): keep it
                    continue
                since = passed
            if now - since > ORPHAN_AFTER:
                back.append(entry)
        for entry in back:  # ``released`` stays the receiver's: a new generation will do
            del self._out[entry]
        return bool(back)


def _padded(size: int) -> int:
    return max(layout.ALIGN, -(-size // layout.ALIGN) * layout.ALIGN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process now holds that pid
        return True
    return True
