"""What the orchestrator creates, and what each process of a pipeline holds.

One pool per sending process: number 0 is the orchestrator's (what ``forward()`` sends),
number ``i + 1`` is worker process ``i``'s output. One pool per sender, not per link: a
sender with replicas downstream places an array before it knows which replica takes it,
and a receiver with replicas upstream reads each one's pool. Every process gets every
pool's descriptor (``Popen(pass_fds=...)``; the numbers travel in its spec) and maps them
all once (a region may reach it from any pool, passed on by the stages between); a
restarted worker gets the same ones and takes up its own pool where its predecessor left it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from pystream_zmq.shm import layout
from pystream_zmq.shm.receiver import Views
from pystream_zmq.shm.sender import DEFAULT_MIN_BYTES, WARM_BYTES, Allocator

DEFAULT_POOL_MB = 256  # per sending process, sparse: only what is in flight takes memory
SOURCE = 0  # the orchestrator's pool


def create_pools(count: int, pool_bytes: int) -> list[int]:
    """``count`` new pools of ``pool_bytes`` each: their descriptors (the caller closes
    them). None of them has a name: nothing to clean up after a crash."""
    fds: list[int] = []
    try:
        for _ in range(count):
            fds.append(layout.create(pool_bytes))
    except BaseException:
        close_pools(fds)
        raise
    return fds


def close_pools(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Shared:
    """A process's pools: ``allocator`` for the one it sends into (None: it sends none),
    ``views`` for those it receives from: every one of the run, since a region may come
    from further up than the processes just upstream."""

    def __init__(
        self, fds: Sequence[int], *, sends: int | None, min_bytes: int = DEFAULT_MIN_BYTES
    ) -> None:
        # Every pool of the run is read: a stage may pass on, without a copy, a region it
        # received from further up (shm.handoff). A mapping costs address space, and
        # memory only for the pages touched.
        maps = {n: layout.Pool(fd) for n, fd in enumerate(fds)}
        self.allocator = None
        if sends is not None:
            warm = WARM_BYTES if sends == SOURCE else 0
            self.allocator = Allocator(maps[sends], sends, min_bytes, warm)
        self.views = Views(maps)
