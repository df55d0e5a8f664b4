"""A worker passing on a region it received, without a copy: a lease that moves with the
item. A no-op stage (or one that changes the array in place) returns the very array it
was given; copying it into the worker's own pool would cost a memcpy per hop, which is
all the cost of a hop for large frames. Instead the descriptor it came with goes on, and
the next receiver holds the lease: it claims it, and releases it, as if it had come from
the pool's sender directly.

Only when that is provably safe: after the send, nothing in this process may see the
region again, since its next holder may let it go and its sender reuse it. CPython counts
references exactly, so ``find`` asks, before the item is encoded, of each array in it:

- is it held only by its container, each container on the way up only by its own, and
  the item only by the worker (which has put it in a one-item list, its one reference);
- is each array between it and the region's owner (``.base``, then ``.base`` again: numpy
  views collapse onto the array ``decode`` built, whose base is the owner) held only by
  the one below it, the owner only by the one array above it;
- are there no weak references to any of them (but the owner's finalizer, which is ours);
- does the array cover the whole region, C-contiguous (its dtype and shape may differ).

A stage that keeps the array, a view or slice of it, its dict, or a memoryview of it,
fails one of these, and its output is copied as before. Only exact dicts, lists and
tuples are looked into: a subclass may hold references the count does not explain.

The counts an object held once shows are measured at import, by this very code on
objects made for it (``_BASE``), and a self-test checks that one more reference at any
level is seen; where it is not (a Python whose counts are not exact: a free-threaded
build), nothing is passed on: every array is copied.
"""

from __future__ import annotations

import ctypes
import sys
import sysconfig
import weakref
from typing import Any

import numpy as np

from pystream_zmq.shm.layout import Pool
from pystream_zmq.shm.receiver import Lease, Owner, Views
from pystream_zmq.shm.sender import Allocator

_CONTAINERS = (dict, list, tuple)
Found = dict[int, tuple[np.ndarray[Any, Any], Lease, Owner]]  # {id(array): ...}


def _count(obj: object) -> int:
    """The references to ``obj``: every count goes through here, from a local of
    ``find``, so that they differ only by the references held elsewhere."""
    return sys.getrefcount(obj)


def find(box: list[Any], held: dict[int, Lease], base: int) -> Found:
    """The arrays in ``box[0]`` (the item; ``box`` must be the caller's only reference to
    it) that may be passed on without a copy (see the module docstring), each with its
    lease and owner. ``base``: the count of an object held once (``_BASE``)."""
    found: Found = {}
    todo: list[Any] = [box]  # containers known to be held only on the way from the item
    while todo:
        container = todo.pop()
        for value in container.values() if type(container) is dict else container:
            kind = type(value)
            if kind in _CONTAINERS:
                if _count(value) == base and not weakref.getweakrefcount(value):
                    todo.append(value)
                continue
            if kind is not np.ndarray or _count(value) != base:
                continue
            if weakref.getweakrefcount(value):
                continue
            link = value.base
            while type(link) is np.ndarray:
                if _count(link) != base or weakref.getweakrefcount(link):
                    break
                link = link.base
            else:
                lease = held.get(id(link))
                if (
                    lease is not None
                    and _count(link) == base
                    and weakref.getweakrefcount(link) == 1  # its finalizer
                    and lease.owned_by(link)
                    and value.flags.c_contiguous
                    and value.nbytes == lease.length
                    and value.ctypes.data == ctypes.addressof(link)
                ):
                    found[id(value)] = (value, lease, link)
            del link
    return found


class Handoff:
    """A worker's placer (``codec.Placer``): the arrays ``prepare`` found go on with their
    own descriptors, committed as they are met (``Views.pass_on``); the rest go to its own
    pool through ``allocator``, as before. One item at a time, in the worker's thread:
    ``prepare``, the encode, then ``done``."""

    def __init__(self, allocator: Allocator, views: Views) -> None:
        self.allocator = allocator
        self.views = views
        self.counters = allocator.counters  # shm_passed among its output's counters
        self._ready: Found = {}
        self._passed: list[tuple[Lease, Owner]] = []  # passed on for the item being sent
        self._copied: list[int] = []  # the entries of its own pool taken for it

    def prepare(self, box: list[Any]) -> None:
        """Look for what may go on without a copy in ``box[0]``, the item about to be
        encoded; ``box`` is the caller's only reference to it."""
        if ENABLED and self.views.held:
            self._ready = find(box, self.views.held, _BASE)

    def place(self, arr: np.ndarray[Any, Any]) -> tuple[int, int, int, int] | None:
        if self._ready:
            got = self._ready.pop(id(arr), None)
            if got is not None and got[0] is arr:
                _, lease, owner = got
                self.views.pass_on(lease, owner)  # before the send: see layout's note
                self._passed.append((lease, owner))
                counters = self.counters
                counters["shm_arrays"] += 1
                counters["shm_bytes"] += arr.nbytes
                counters["shm_passed"] += 1
                return lease.number, lease.entry, lease.gen, lease.offset
        spot = self.allocator.place(arr)
        if spot is not None:
            self._copied.append(spot[1])
        return spot

    def cancel(self, entries: list[int]) -> None:
        """The item is not sent after all: what was passed on is this process's again,
        and what was copied is freed. (``entries`` would name both pools' entries alike:
        what this object noted is used instead.)"""
        for lease, owner in self._passed:
            self.views.take_back(lease, owner)
            counters = self.counters
            counters["shm_arrays"] -= 1
            counters["shm_bytes"] -= lease.length
            counters["shm_passed"] -= 1
        self.allocator.cancel(self._copied)
        self.done()

    def done(self) -> None:
        """The item is sent (or let go): forget it, and hold none of its arrays."""
        self._ready = {}
        self._passed = []
        self._copied = []


def _calibrate() -> int:
    """The count ``find`` sees of an object held once."""
    box = [object()]
    for value in box:
        return _count(value)
    raise AssertionError  # pragma: no cover


def _self_test(base: int) -> bool:
    """Whether ``find`` passes on an array held once, and not one held once more at any
    level: the item, a container in it, the array, the array under it, the owner."""
    memory = bytearray(4096)
    pool = Pool.__new__(Pool)  # never touched: nothing is passed on here

    def probe() -> tuple[list[Any], dict[int, Lease], Owner]:
        owner = (ctypes.c_char * 4096).from_buffer(memory)
        lease = Lease(pool, 0, 0, 1, 0, 4096)
        lease.finalizer = weakref.finalize(owner, int)
        arr = np.frombuffer(owner, np.uint8).reshape(64, 64)  # type: ignore[call-overload]
        return [{"a": [arr]}], {id(owner): lease}, owner

    box, held, owner = probe()
    del owner
    if len(find(box, held, base)) != 1:
        return False
    for extra in ("item", "list", "array", "under", "owner", "weakref"):
        box, held, owner = probe()
        arr = box[0]["a"][0]
        kept = {
            "item": box[0], "list": box[0]["a"], "array": arr, "under": arr.base,
            "owner": owner, "weakref": weakref.ref(arr),
        }[extra]  # fmt: skip
        del owner, arr
        if find(box, held, base):
            return False
        del kept
    return True


_BASE = _calibrate()
# A free-threaded build counts references per thread, and lazily: not exact enough.
ENABLED = not sysconfig.get_config_var("Py_GIL_DISABLED") and _self_test(_BASE)
