"""Watches a parallel pipeline's worker processes and restarts the ones that die."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence

from pystream_zmq.errors import WorkerCrashedError
from pystream_zmq.orchestrator.launcher import WorkerProcess
from pystream_zmq.profiling.store import MEMORY_RESTARTS, RESTARTS
from pystream_zmq.worker.memory import EXIT_OVER_MEMORY
from pystream_zmq.worker.watchdog import EXIT_PAST_DEADLINE

log = logging.getLogger(__name__)

CHECK_INTERVAL = 0.1  # seconds: a dead worker is noticed within this
MIN_BACKOFF = 0.1
MAX_BACKOFF = 2.0
# Why a worker was restarted (WorkerStats.restart_reasons): it died of itself, or it was
# ended on purpose, past its deadline or its memory limit.
# "relinked": ended so that it connects to a stage that moved to another cluster node.
DIED, DEADLINE, MAX_MEMORY, RELINKED = "died", "deadline", "max_memory", "relinked"
# Restarts that are not failures: max_restarts does not count them, and they wait 0.1 s.
_ON_PURPOSE = (MAX_MEMORY, RELINKED)
_EXIT_REASONS = {
    EXIT_PAST_DEADLINE: (DEADLINE, "a stage call ran past its deadline"),
    EXIT_OVER_MEMORY: (MAX_MEMORY, "its resident memory passed max_memory_mb"),
}


class Supervisor(threading.Thread):
    """Polls every worker; one that exited is started again from its original definition
    (``relaunch(index)``) after a backoff of 0.1 s, 0.2 s, 0.4 s ... up to ``max_restarts``
    times. Past that, ``failed`` names the stage, the pipeline refuses to go on, and
    ``on_give_up()`` is called once (what is still in flight will never come out). A worker
    replaced for its memory (MAX_MEMORY) is started again after 0.1 s, as often as it takes:
    that is the limit doing its job, not a failure.
    ``watch``: other children's checks, called at every poll (the profile writer's, which
    restarts its process itself)."""

    def __init__(
        self,
        procs: Sequence[WorkerProcess],
        names: Sequence[str],
        relaunch: Callable[[int], None],
        max_restarts: int,
        on_give_up: Callable[[], None] = lambda: None,
        *,
        watch: Sequence[Callable[[], object]] = (),
    ) -> None:
        super().__init__(name="pystream-supervisor", daemon=True)
        self._procs = procs
        self._names = list(names)
        self._relaunch = relaunch
        self._max_restarts = max_restarts
        self._on_give_up = on_give_up
        self._watch = list(watch)
        self._stopping = threading.Event()
        self.restarts = [0] * len(names)
        self.restart_reasons: list[dict[str, int]] = [{} for _ in names]  # {cause: restarts}
        self.restarts_in_all = 0
        self.failed: WorkerCrashedError | None = None
        self._expected: dict[int, tuple[int, str, str]] = {}  # index: (pid, cause, reason)

    def expect_exit(self, index: int, pid: int, cause: str, reason: str) -> None:
        """Process ``pid`` (worker ``index``) is being ended on purpose (``cause``: DEADLINE
        or MAX_MEMORY), for ``reason``: its restart is logged as such, and counted under
        ``cause``."""
        self._expected[index] = (pid, cause, reason)

    def count_restart(self, index: int, cause: str) -> None:
        """Worker ``index`` was restarted on purpose, by the caller (RELINKED): count it."""
        self.restarts[index] += 1
        reasons = self.restart_reasons[index]
        reasons[cause] = reasons.get(cause, 0) + 1
        self.restarts_in_all += 1

    def restart_counters(self, indexes: Iterable[int] | None = None) -> dict[str, dict[str, int]]:
        """Restarts, in all and past max_memory_mb, of these workers (default: of those
        restarted), as profile counters under each worker's path (beside its own counters,
        whose names differ)."""
        if indexes is None:
            indexes = [index for index, count in enumerate(self.restarts) if count]
        return {
            self._names[i]: {
                RESTARTS: self.restarts[i],
                MEMORY_RESTARTS: self.restart_reasons[i].get(MAX_MEMORY, 0),
            }
            for i in indexes
        }

    def run(self) -> None:
        while not self._stopping.wait(CHECK_INTERVAL):
            for index, proc in enumerate(self._procs):
                code = proc.poll()
                if code is not None and self.failed is None:
                    self._restart(index, code)
            for check in self._watch:
                check()

    def _restart(self, index: int, code: int) -> None:
        name, pid = self._names[index], self._procs[index].pid
        expected = self._expected.pop(index, None)
        if expected is not None and expected[0] == pid:
            cause, reason = expected[1:]
        else:
            cause, reason = _EXIT_REASONS.get(code, (DIED, ""))
        ended = f"was ended ({reason})" if reason else "died"
        reasons = self.restart_reasons[index]
        # what max_restarts counts
        failures = self.restarts[index] - sum(reasons.get(c, 0) for c in _ON_PURPOSE)
        if cause not in _ON_PURPOSE and failures >= self._max_restarts:
            detail = f"its worker {ended}, exit code {code}, after {self._max_restarts} restarts"
            log.error("stage %s: %s; the pipeline cannot go on", name, detail)
            self._give_up(WorkerCrashedError(name, detail))
            return
        self.restarts[index] += 1
        reasons[cause] = reasons.get(cause, 0) + 1
        self.restarts_in_all += 1
        if cause in _ON_PURPOSE:
            backoff = MIN_BACKOFF
            log.warning(
                "worker of stage %s (pid %d) %s with exit code %d; replaced in %.1f s "
                "(%s restart %d)", name, pid, ended, code, backoff, cause, reasons[cause],
            )  # fmt: skip
        else:
            backoff = min(MIN_BACKOFF * 2**failures, MAX_BACKOFF)
            log.error(
                "worker of stage %s (pid %d) %s with exit code %d; restart %d of %d in %.1f s",
                name, pid, ended, code, failures + 1, self._max_restarts, backoff,
            )  # fmt: skip
        if self._stopping.wait(backoff):
            return
        try:
            self._relaunch(index)
        except Exception as e:  # e.g. the stage no longer loads: count it as another death
            log.exception("could not restart stage %s", name)
            self._give_up(WorkerCrashedError(name, f"it could not be restarted ({e!r})"))

    def _give_up(self, error: WorkerCrashedError) -> None:
        self.failed = error
        try:
            self._on_give_up()
        except Exception:  # the thread must not die of it: failed already says enough
            log.exception("after stage %s failed for good", error.stage)

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join()
