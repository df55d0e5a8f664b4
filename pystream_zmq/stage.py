"""Stages: the user's unit of work, its naming rules, and running a chain of them inline."""

from __future__ import annotations

import abc
import logging
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pystream_zmq.errors import PyStreamError, StageNameError

MAIN_PIPELINE_NAME = "MainPipeline"
PATH_SEPARATOR = "__"
REPLICA_MARK = "#"  # a replica's counters are recorded under "<stage path>#<replica>"

log = logging.getLogger(__name__)

Event = tuple[str, int, float, float, float]  # (path, seq, arrive, start, end)


class Stage(abc.ABC):
    """A stage with state: derive from it and define ``__call__`` and ``cleanup``.

    Setting ``self.name`` in ``__init__`` names the stage in profiles.
    """

    @abc.abstractmethod
    def __call__(self, data: Any) -> Any:
        """Process one item and return the result for the next stage."""

    @abc.abstractmethod
    def cleanup(self) -> None:
        """Release resources and reset state; called by ``Pipeline.cleanup()``."""


def check_stage_name(name: object) -> str:
    """Return ``name`` if it can be a profile level, else raise StageNameError."""
    if not isinstance(name, str) or not name:
        raise StageNameError(f"a stage name must be a non-empty str, not {name!r}")
    problems = []
    if "-" in name:
        problems.append("contains '-'")
    if PATH_SEPARATOR in name:
        problems.append(f"contains {PATH_SEPARATOR!r}")
    if name.startswith("_") or name.endswith("_"):
        problems.append("starts or ends with '_'")
    if name == MAIN_PIPELINE_NAME:
        problems.append(f"is reserved ({MAIN_PIPELINE_NAME!r})")
    if problems:
        raise StageNameError(f"invalid stage name {name!r}: it {' and '.join(problems)}")
    return name


Leaf = tuple[str, Callable[[Any], Any]]  # (profile path, stage)

ON_ERROR_POLICIES = ("drop", "raise")


@dataclass
class StageFailure:
    """A stage raised on an item: what ``StageError`` reports."""

    path: str
    seq: int
    message: str
    traceback: str


def unsendable(path: str, seq: int, error: Exception) -> StageFailure:
    """The output of stage ``path`` on item ``seq`` cannot be sent (``error`` is what the
    codec raised): log it, in the same words under ``serialize()`` and ``parallelize()``,
    and return the failure that stands for the dropped item. Call it where ``error`` is
    caught, so that the failure carries its traceback."""
    log.error(
        "stage %s returned what cannot be sent (item %d dropped): %s",
        path, seq, error, extra={"stage": path, "seq": seq},
    )  # fmt: skip
    return StageFailure(path, seq, f"{type(error).__name__}: {error}", traceback.format_exc())


class StageChain:
    """Runs leaves one after the other on an item, timing each one.

    A stage that raises drops the item: the error is logged with the stage path and the
    item's sequence number, counted, and the chain stays usable for the next item. ``run``
    then returns the failure, for stages whose policy is to raise it to the user.

    ``check`` and ``ends`` ({leaf path: unit path}), for ``serialize()``: after each of
    those leaves, ``check(output)``; an output it refuses (a ``PyStreamError``, what
    sending it would raise) fails the same way, counted in ``encode_errors`` by unit path.
    """

    def __init__(
        self,
        leaves: Sequence[Leaf],
        record: Callable[[Event], None] | None,
        check: Callable[[Any], None] | None = None,
        ends: Mapping[str, str] | None = None,
    ) -> None:
        self.leaves = list(leaves)
        self._record = record
        self._check = check
        ends = ends if check is not None and ends else {}
        # (path, stage, unit path if its output is checked else None), in order
        self._steps = [(path, stage, ends.get(path)) for path, stage in self.leaves]
        self.errors = {path: 0 for path, _ in self.leaves}  # items each stage dropped by raising
        self.encode_errors = dict.fromkeys(ends.values(), 0)  # outputs refused, by unit
        # (path, seq, time.time() at start) of the stage call under way, None between calls:
        # a worker's watchdog thread reads it while the stage runs (worker/watchdog.py).
        self.current: tuple[str, int, float] | None = None

    def run(self, data: Any, seq: int, arrive: float) -> tuple[bool, Any]:
        """(True, output), or (False, StageFailure) when a stage raised or ``check``
        refused its output. The check's time counts as the next stage's wait, as a send's
        would."""
        for path, stage, unit in self._steps:
            start = time.time()
            self.current = (path, seq, start)
            try:
                data = stage(data)
            except Exception as e:
                self.current = None
                self.errors[path] += 1
                log.exception(
                    "stage %s raised on item %d; the item is dropped",
                    path, seq, extra={"stage": path, "seq": seq},
                )  # fmt: skip
                return False, StageFailure(
                    path, seq, f"{type(e).__name__}: {e}", traceback.format_exc()
                )
            end = time.time()
            if self._record is not None:
                self._record((path, seq, arrive, start, end))
            arrive = end
            if unit is not None:
                try:
                    self._check(data)  # type: ignore[misc]  # set wherever a unit is
                except PyStreamError as e:
                    self.current = None
                    self.encode_errors[unit] += 1
                    return False, unsendable(path, seq, e)
        self.current = None
        return True, data

    def cleanup(self) -> None:
        """Call every stage's own cleanup(); one failing does not stop the others."""
        for path, stage in self.leaves:
            cleanup = getattr(stage, "cleanup", None)
            if callable(cleanup):
                try:
                    cleanup()
                except Exception:
                    log.exception("cleanup() of stage %s raised", path, extra={"stage": path})


class EventBuffer:
    """Collects profile events and hands them on in batches, so the per-item cost is an
    append. ``flush`` must never block the data path: ``sink`` decides what to drop."""

    def __init__(
        self, sink: Callable[[list[Event]], object], max_events: int = 512, max_age: float = 0.2
    ) -> None:
        self._sink = sink
        self._max_events = max_events
        self._max_age = max_age
        self._events: list[Event] = []
        self._oldest = 0.0

    def add(self, event: Event) -> None:
        if not self._events:
            self._oldest = time.monotonic()
        self._events.append(event)
        if len(self._events) >= self._max_events:
            self.flush()

    def flush_if_old(self) -> None:
        if self._events and time.monotonic() - self._oldest >= self._max_age:
            self.flush()

    def flush(self) -> None:
        if self._events:
            events, self._events = self._events, []
            self._sink(events)
