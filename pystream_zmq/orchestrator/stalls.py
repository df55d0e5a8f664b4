"""What the workers' watchdogs report over the status link (``wire/status.py``, read by the
collector thread): logged here, in the user's process, under the ``pystream_zmq`` logger,
and kept, so that a drain, the state copy and the stop can name the item a worker is busy
with, and pass a stuck worker by instead of waiting for it. A worker past its deadline or
its memory limit is handed to ``on_limit``, which has it replaced."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pystream_zmq.errors import DecodeError
from pystream_zmq.orchestrator.supervisor import DEADLINE, MAX_MEMORY
from pystream_zmq.plan import MIB
from pystream_zmq.wire import status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Busy:
    """The stage call a worker was last reported inside."""

    path: str
    seq: int
    pid: int
    started: float  # time.monotonic() here, from how long it had run when reported
    stalled: bool  # past its stall_after

    def describe(self) -> str:
        running = time.monotonic() - self.started
        return f"stage {self.path} has been running item {self.seq} for {running:.1f} s"


class StallBoard:
    """``pid_of(index)``: the pid of worker ``index`` now (a report from a process since
    replaced is ignored); ``on_limit(index, pid, cause, reason)``: that worker passed a limit
    (``cause``: DEADLINE, a stage call ran past its deadline; MAX_MEMORY, its resident size
    passed its max_memory_mb after an item) and must be restarted."""

    def __init__(
        self,
        names: Sequence[str],
        pid_of: Callable[[int], int | None],
        on_limit: Callable[[int, int, str, str], None],
    ) -> None:
        self._names = list(names)
        self._pid_of = pid_of
        self._on_limit = on_limit
        self._lock = threading.Lock()
        self._busy: dict[int, Busy] = {}
        self.malformed = 0

    def take(self, message: list[bytes]) -> None:
        """A status message (in the collector's thread)."""
        try:
            kind, report = status.unpack(message)
        except DecodeError as e:
            self.malformed += 1
            if self.malformed == 1 or self.malformed % 1000 == 0:
                log.warning("ignored a malformed status message (%d so far): %s", self.malformed, e)
            return
        index = report.process
        if not 0 <= index < len(self._names) or self._pid_of(index) != report.pid:
            return  # from a process that has been replaced since, or not one of ours
        busy = Busy(
            report.path, report.seq, report.pid, time.monotonic() - report.running, report.stalled
        )
        with self._lock:
            if kind == status.RUNNING:
                self._busy[index] = busy
            else:
                known = self._busy.get(index)
                if known is not None and (known.path, known.seq) == (report.path, report.seq):
                    del self._busy[index]
        if kind == status.RUNNING and report.stalled:
            log.warning(
                "%s (stall_after=%g s; worker pid %d)", busy.describe(), report.limit, report.pid
            )
        elif kind == status.DONE and report.stalled:
            log.warning(
                "stage %s finished item %d late, after %.1f s",
                report.path, report.seq, report.running,
            )  # fmt: skip
        elif kind == status.DEADLINE:
            reason = f"item {report.seq} ran past its deadline of {report.limit:g} s"
            log.error(
                "stage %s: %s; its worker is restarted, and the item is counted lost",
                report.path, reason,
            )  # fmt: skip
            self._limit_passed(index, report, DEADLINE, reason)
        elif kind == status.MEMORY:
            reason = (
                f"its resident memory, {report.running / MIB:.0f} MB, passed "
                f"max_memory_mb={report.limit / MIB:g} after item {report.seq}"
            )
            log.warning(
                "stage %s: %s; its worker is replaced, and what was queued in it is counted "
                "lost", report.path, reason,
            )  # fmt: skip
            self._limit_passed(index, report, MAX_MEMORY, reason)

    def _limit_passed(self, index: int, report: status.Report, cause: str, reason: str) -> None:
        try:  # in the collector's thread: it must go on whatever happens here
            self._on_limit(index, report.pid, cause, f"stage {report.path}: {reason}")
        except Exception:
            log.exception("could not restart the worker of stage %s", report.path)

    def busy(self) -> dict[int, Busy]:
        """{worker index: the call it is busy with}, for calls running past the notice time."""
        with self._lock:
            return dict(self._busy)

    def line(self, index: int) -> str | None:
        """What worker ``index`` is busy with, if it is inside a call past the notice time."""
        busy = self.busy().get(index)
        if busy is None:
            return None
        name = self._names[index]  # a replica's, or a serialized child's whole unit
        return busy.describe() + ("" if name == busy.path else f" (worker {name})")

    def lines(self) -> list[str]:
        """A line per worker inside a stage call past the notice time."""
        return [line for index in sorted(self.busy()) if (line := self.line(index))]

    def stuck(self) -> set[int]:
        """The workers inside a stage call past its stall_after."""
        with self._lock:
            return {index for index, busy in self._busy.items() if busy.stalled}

    def forget(self, index: int) -> None:
        """Worker ``index`` was started again."""
        with self._lock:
            self._busy.pop(index, None)
