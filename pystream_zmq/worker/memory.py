"""A worker's resident memory (RSS): in its counters (``rss_bytes``, ``rss_peak_bytes``),
and held against its limit, the smallest ``max_memory_mb`` of its stages.

On Linux the current size comes from ``/proc/self/statm`` (under 10 us to read) and the
peak from ``VmHWM`` in ``/proc/self/status``, both this process's own. Elsewhere only
``getrusage`` is at hand, whose ``ru_maxrss`` is the peak; it stands for the current size
too (so a limit there acts on the peak). Where neither exists, nothing is measured.

With a limit the size is read between items, at most every CHECK_INTERVAL: a stage that
grows fast may pass the limit by what it takes in that time before it is caught.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable

from pystream_zmq.plan import MIB, Limits
from pystream_zmq.profiling.store import RSS, RSS_PEAK

EXIT_OVER_MEMORY = 5  # the worker passed its memory limit and, not replaced, ended itself
CHECK_INTERVAL = 0.1  # seconds: with a limit, the size is read at most this often
REPLACE_GRACE = 2.0  # once over the limit, how long to wait to be replaced before leaving

_STATM = "/proc/self/statm"
_STATUS = "/proc/self/status"


def unit_limit(limits: Iterable[Limits]) -> float:
    """The memory limit of a worker running stages with these limits, in bytes: the
    smallest (``math.inf`` when none is set)."""
    return min((limit.max_memory_bytes() for limit in limits), default=math.inf)


class Memory:
    """This process's resident size now and at its highest, in bytes (0: unknown)."""

    def __init__(self, limit: float = math.inf) -> None:
        self.limit = limit
        self.rss = 0
        self.peak = 0
        self._checked = -math.inf
        self._pending = False  # items were handled since the last read against the limit
        self.read()

    def read(self, with_peak: bool = True) -> int:
        """Read the current size, and the peak (which takes as long again); returns the
        current size."""
        current = _current()
        peak = _peak() if with_peak or not current else 0
        self.rss = current or peak
        self.peak = max(self.peak, self.rss, peak)
        return self.rss

    def check_at_start(self) -> None:
        """ValueError if the size is over the limit already (once the stages are loaded): the
        worker would be replaced after every item."""
        if self.rss > self.limit:
            raise ValueError(
                f"the worker's resident memory once its stages are loaded, "
                f"{self.rss / MIB:.0f} MB, is already over max_memory_mb={self.limit / MIB:g}"
            )

    def over_limit(self, after_item: bool = True) -> bool:
        """Whether the size is over the limit, asked between items: after each one
        (``after_item``), and at every poll, so that the last items before a pause are
        checked too. Read at most every CHECK_INTERVAL, and only when an item was handled
        since the last read (never without a limit)."""
        if self.limit == math.inf:
            return False
        self._pending |= after_item
        now = time.monotonic()
        if not self._pending or now - self._checked < CHECK_INTERVAL:
            return False
        self._checked, self._pending = now, False
        return self.read(with_peak=False) > self.limit

    def counters(self) -> dict[str, int]:
        """{rss_bytes, rss_peak_bytes}, read now; empty when nothing can be measured."""
        self.read()
        return {RSS: self.rss, RSS_PEAK: self.peak} if self.rss else {}


def _current() -> int:
    try:
        with open(_STATM, "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _peak() -> int:
    """VmHWM on Linux: ru_maxrss there is inherited across exec (a worker would show the
    orchestrator's peak at the time it was started)."""
    try:
        with open(_STATUS, "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return 0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes there, KiB elsewhere
