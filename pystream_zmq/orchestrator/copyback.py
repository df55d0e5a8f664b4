"""Bringing the stages' state (their attributes) back from the workers, for ``stop_loop()``
and ``cleanup()``. A worker sends only what changed since its last reply, and keeps an
attribute over its stage's ``max_attribute_bytes`` (worker/state.py): that one is named in
one warning. A worker stuck in a stage call is not asked (it could not answer); after a
reply that did not come in time, the next request asks every worker for everything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pystream_zmq.errors import DecodeError
from pystream_zmq.orchestrator.control import Control
from pystream_zmq.orchestrator.stalls import StallBoard
from pystream_zmq.plan import Plan
from pystream_zmq.wire import codec, transport
from pystream_zmq.worker.state import ALL_VARIANT, KEPT_LOCAL, STATE_COMMANDS

log = logging.getLogger(__name__)

CLEANUPS = {command for command, (cleanup, _) in STATE_COMMANDS.items() if cleanup}


class CopyBack:
    """``answering()``: the workers the control channel asks (alive, and not stuck)."""

    def __init__(
        self,
        plan: Plan,
        control: Control,
        board: StallBoard,
        answering: Callable[[], list[int]],
        alive: Callable[[], list[int]],
    ) -> None:
        self._names = [p.name for p in plan.processes]
        self._caps = {
            path: limits.resolved()[2]
            for unit in plan.units
            for path, limits in unit.limits_by_path().items()
        }
        self._control = control
        self._board = board
        self._answering = answering
        self._alive = alive
        self._resend = False  # a reply was missed: ask for every attribute next time
        self._warned: set[tuple[str, str]] = set()  # attributes named as kept in a worker
        self.unanswered: set[int] = set()  # the workers that did not answer the last request
        self.unanswered_cleanup: set[int] = set()  # ... when it was CLEANUP: stuck, maybe

    def collect(self, command: bytes, timeout: float) -> tuple[dict[str, dict[str, Any]], int]:
        """({path: {name: value}} of what changed, the profile events the workers that
        answered have sent) after ``command`` (GET_STATE or CLEANUP)."""
        for index in sorted(self._board.stuck() & set(self._alive())):
            log.warning(
                "%s: not asked for its state; its attributes keep the values last copied back",
                self._board.line(index),
            )
        asked = set(self._answering())
        if self._resend:
            command = ALL_VARIANT.get(command, command)
        replies = self._control.ask_all(command, timeout)
        self.unanswered = asked - replies.keys()
        self.unanswered_cleanup = self.unanswered if command in CLEANUPS else set()
        self._resend = bool(self.unanswered)
        for index in sorted(self.unanswered):
            line = self._board.line(index)
            if line is not None:
                log.warning("%s, so it did not answer %r in time", line, command)
        states: dict[str, dict[str, Any]] = {}
        sent = 0
        for index, reply in replies.items():
            if reply[0] != transport.STATE or len(reply) < 2 or len(reply[1]) != 8:
                continue
            sent += int.from_bytes(reply[1], "little")
            try:
                state = codec.decode(reply[2:])
            except DecodeError as e:
                log.warning("unreadable state from %s: %s", self._names[index], e)
                continue
            if isinstance(state, dict):
                self._warn_kept(state.pop(KEPT_LOCAL, None))
                states.update(state)
        return states, sent

    def _warn_kept(self, kept: Any) -> None:
        """One warning per attribute left in its worker for its size."""
        for path, sizes in kept.items() if isinstance(kept, dict) else ():
            for name, size in sizes.items() if isinstance(sizes, dict) else ():
                if (path, name) in self._warned or not isinstance(size, int):
                    continue
                self._warned.add((path, name))
                cap = self._caps.get(path)
                why = (
                    f"over max_attribute_bytes={cap:.0f}"
                    if cap is not None and size > cap
                    else "too large for one state reply with the others"
                )
                log.warning(
                    "stage %s: attribute %r (%d bytes encoded) is %s; it stays in the worker, "
                    "and your stage object keeps its own value",
                    path, name, size, why,
                )  # fmt: skip
