"""Watches a parallel pipeline's worker processes and restarts the ones that die."""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable, Sequence

from pystream_zmq.errors import WorkerCrashedError
from pystream_zmq.worker.watchdog import EXIT_PAST_DEADLINE

log = logging.getLogger(__name__)

CHECK_INTERVAL = 0.1  # seconds: a dead worker is noticed within this
MAX_BACKOFF = 2.0
_EXIT_REASONS = {EXIT_PAST_DEADLINE: "a stage call ran past its deadline"}


class Supervisor(threading.Thread):
    """Polls every worker; one that exited is started again from its original definition
    (``relaunch(index)``) after a backoff of 0.1 s, 0.2 s, 0.4 s ... up to ``max_restarts``
    times. Past that, ``failed`` names the stage, the pipeline refuses to go on, and
    ``on_give_up()`` is called once (what is still in flight will never come out).
    ``watch``: other children's checks, called at every poll (the profile writer's, which
    restarts its process itself)."""

    def __init__(
        self,
        procs: list[subprocess.Popen[bytes]],
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
        self.restarts_in_all = 0
        self.failed: WorkerCrashedError | None = None
        self._expected: dict[int, tuple[int, str]] = {}  # index: (pid, why it is ended)

    def expect_exit(self, index: int, pid: int, reason: str) -> None:
        """Process ``pid`` (worker ``index``) is being ended on purpose, for ``reason``: its
        restart is logged as such, and counts as one."""
        self._expected[index] = (pid, reason)

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
        expected_pid, reason = self._expected.pop(index, (pid, _EXIT_REASONS.get(code)))
        ended = f"was ended ({reason})" if reason and expected_pid == pid else "died"
        if self.restarts[index] >= self._max_restarts:
            detail = f"its worker {ended}, exit code {code}, after {self._max_restarts} restarts"
            log.error("stage %s: %s; the pipeline cannot go on", name, detail)
            self._give_up(WorkerCrashedError(name, detail))
            return
        backoff = min(0.1 * 2 ** self.restarts[index], MAX_BACKOFF)
        self.restarts[index] += 1
        self.restarts_in_all += 1
        log.error(
            "worker of stage %s (pid %d) %s with exit code %d; restart %d of %d in %.1f s",
            name, pid, ended, code, self.restarts[index], self._max_restarts, backoff,
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
