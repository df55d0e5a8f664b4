"""One shared-memory pool: an anonymous file (``os.memfd_create``) that its sender and its
receivers each map once. Nothing is ever named in /dev/shm: the file lives while some
process holds its descriptor or a mapping of it, so ``kill -9`` of any or all of them
leaves nothing behind.

Layout, little-endian: a header, a table of leases, then the data area (page-aligned).
A lease entry describes one region handed to a receiver. Every field has a single writer
at a time, so no lock or atomic is needed across processes:

- the sender writes ``sent`` (the entry's generation, raised on each use), ``offset``,
  ``length``, ``sender_pid`` and ``sent_time``, ``sent`` last;
- the lease's holder, the receiver that has it now, writes the rest: ``claim`` (its pid,
  and the low 32 bits of the generation it took, in one 8-byte store) when it builds an
  array on the region, and ``released`` (= the generation) when the last view of that
  array is gone. A holder that passes the region on whole, unchanged, to the next process
  (``pass_on``: a lease that moves with the item) writes ``passed_time``, then a claim of
  pid 0 ("in flight"), and never touches the entry again: the next receiver is the holder
  from then on. Holders follow each other along the item's path, one at a time.

An entry is in use while ``released != sent``.

Memory ordering: every write is a plain store, and a reader of another process's fields
may see them late. The sender publishes a region's place before its generation, so a
receiver that sees the generation sees the place (``publish``; the receiver checks both).
``pass_on`` stores ``passed_time`` before the claim; the sender reads the claim first and
trusts a ``passed_time`` only when it is not older than ``sent_time`` (a stale one from an
earlier use of the entry is older), so a reordered view errs on keeping the region out of
use, never on taking it back early (``sender.Allocator._reclaim``).
"""

from __future__ import annotations

import mmap
import os
import struct

MAGIC = b"PSZMQSHM"
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, entries, data offset, data size
VERSION = 2
# sent, released, offset, length, sender pid, spare, sent time, claim, passed time
ENTRY = struct.Struct("<QQQQIIdQd")
_SENT, _RELEASED, _CLAIM, _PASSED = 0, 8, 48, 56
_META = struct.Struct("<QQIId")  # offset, length, sender pid, spare, sent time: at +16
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
ENTRIES = 256  # leases per pool: arrays of one sender held at once, at most
ALIGN = 4096  # regions start on a page: aligned for every dtype, and for memcpy
_TABLE_AT = 64
DATA_AT = -(-(_TABLE_AT + ENTRIES * ENTRY.size) // ALIGN) * ALIGN
GEN_MASK = 0xFFFFFFFF
AVAILABLE = hasattr(os, "memfd_create")  # Linux; elsewhere there is no shared-memory path


def create(data_size: int) -> int:
    """A new pool of ``data_size`` bytes of data (rounded up to a page): its descriptor,
    inheritable by the processes it is passed to. Sparse: a page costs memory only once
    something is written to it."""
    data_size = -(-data_size // ALIGN) * ALIGN
    fd = os.memfd_create("pystream-shm", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, DATA_AT + data_size)
        with mmap.mmap(fd, DATA_AT) as header:
            _HEADER.pack_into(header, 0, MAGIC, VERSION, ENTRIES, DATA_AT, data_size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Pool:
    """A process's one mapping of a pool (made once: a mapping per item would cost page
    faults on every item), with the lease table's fields by name."""

    def __init__(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        self.map = mmap.mmap(fd, size)
        magic, version, entries, data_at, data_size = _HEADER.unpack_from(self.map, 0)
        if magic != MAGIC or version != VERSION or data_at + data_size > size:
            raise ValueError(f"descriptor {fd} is not a shared-memory pool of this version")
        self.entries = entries
        self.data_at = data_at
        self.data_size = data_size

    def _at(self, entry: int) -> int:
        return _TABLE_AT + entry * ENTRY.size

    def sent(self, entry: int) -> int:
        return int(_U64.unpack_from(self.map, self._at(entry) + _SENT)[0])

    def released(self, entry: int) -> int:
        return int(_U64.unpack_from(self.map, self._at(entry) + _RELEASED)[0])

    def claim(self, entry: int) -> tuple[int, int]:
        """(pid, low 32 bits of the generation) of the receiver that took it last."""
        value = int(_U64.unpack_from(self.map, self._at(entry) + _CLAIM)[0])
        return value & 0xFFFFFFFF, value >> 32

    def passed_time(self, entry: int) -> float:
        """When a holder last passed the region on (``pass_on``), of whatever generation."""
        return float(_F64.unpack_from(self.map, self._at(entry) + _PASSED)[0])

    def meta(self, entry: int) -> tuple[int, int, int, float]:
        """(offset, length, sender pid, sent time) of its latest use."""
        offset, length, pid, _, when = _META.unpack_from(self.map, self._at(entry) + 16)
        return offset, length, pid, when

    # -- the sender's fields -------------------------------------------------------------
    def publish(self, entry: int, gen: int, offset: int, length: int, when: float) -> None:
        """A region handed out: its place first, the generation last (a receiver checks it)."""
        at = self._at(entry)
        _META.pack_into(self.map, at + 16, offset, length, os.getpid(), 0, when)
        _U64.pack_into(self.map, at + _SENT, gen)

    # -- a receiver's fields -------------------------------------------------------------
    def take(self, entry: int, gen: int) -> None:
        _U64.pack_into(self.map, self._at(entry) + _CLAIM, (gen & GEN_MASK) << 32 | os.getpid())

    def release(self, entry: int, gen: int) -> None:
        _U64.pack_into(self.map, self._at(entry) + _RELEASED, gen)

    def pass_on(self, entry: int, gen: int, when: float) -> None:
        """The holder gives the lease to whoever receives the item next: the time first,
        then the claim of pid 0 (see the module docstring for the order). No dead pid to
        take it back by now; only the orphan rule, counted from ``when``."""
        at = self._at(entry)
        _F64.pack_into(self.map, at + _PASSED, when)
        _U64.pack_into(self.map, at + _CLAIM, (gen & GEN_MASK) << 32)
