"""A worker's log records, where the user looks: records at or above the forwarded level
(WARNING by default) go over the status link to the orchestrator, which logs them again
under ``pystream_zmq.stages.<stage path>`` (orchestrator/worker_logs.py); the rest go to
the worker's stderr as before. ``pystream-worker`` logs to its stderr only.

Either way a flood is summarised (``Repeats``): a stage that raises on every item would
otherwise write a traceback per item. The counters keep the exact numbers.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from pystream_zmq import child
from pystream_zmq.wire import security, status, transport

FULL = 3  # records of one kind passed in full per interval
EVERY = 10.0  # seconds: the interval; then one line says how many were left out
_MAX_KINDS = 1000  # kinds remembered; past that the oldest are forgotten


@dataclass
class _Kind:
    started: float  # when its interval began
    passed: int = 0  # records passed in full in the interval
    quiet: int = 0  # records left out in the interval
    last: str = ""  # the last one left out, formatted


class Repeats(logging.Filter):
    """Passes the first FULL records of a kind (logger, level, message template, stage) in
    an interval of EVERY seconds, and leaves out the rest; the first record of the kind
    after the interval says how many were left out. ``flush()`` says it for every kind
    with records left out (at the end of the process). One per handler, as the last of its
    filters: it counts what the handler would emit."""

    def __init__(self) -> None:
        super().__init__()
        self._kinds: dict[tuple[Any, ...], _Kind] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "summary", False):
            return True
        key = (record.name, record.levelno, str(record.msg), getattr(record, "stage", None))
        now = time.monotonic()
        kind = self._kinds.get(key)
        if kind is None or now - kind.started >= EVERY:
            if len(self._kinds) >= _MAX_KINDS:
                del self._kinds[next(iter(self._kinds))]
            self._kinds[key] = _Kind(now, passed=1)
            if kind is not None and kind.quiet:
                record.msg = (
                    f"{record.msg} (and {kind.quiet} more like this in the last {EVERY:.0f} s)"
                )
            return True
        if kind.passed < FULL:
            kind.passed += 1
            return True
        kind.quiet += 1
        kind.last = record.getMessage()
        return False

    def flush(self) -> None:
        now = time.monotonic()
        for (name, level, _template, stage), kind in list(self._kinds.items()):
            if kind.quiet:
                logging.getLogger(name).log(
                    level,
                    "%d more like this in the last %.0f s, the last: %s",
                    kind.quiet, now - kind.started, kind.last,
                    extra={"summary": True, "stage": stage},
                )  # fmt: skip
                kind.quiet = 0


class Forwarder(logging.Handler):
    """Sends each record to the orchestrator's status link, never blocking: when the link
    is full a record is dropped and counted (``dropped``). Records name the stage and item
    they are about: given with ``extra={"stage": path, "seq": seq}``, else the stage call
    under way (``current()``), else the unit (``unit``)."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        endpoint: str,
        curve: security.Curve | None,
        *,
        process: int,
        unit: str,
        current: Callable[[], tuple[str, int, float] | None],
        level: int,
    ) -> None:
        super().__init__(level)
        self.repeats = Repeats()
        self.addFilter(self.repeats)
        # Used under the handler's lock (Handler.handle), from whichever thread logs.
        self._socket = transport.make_socket(ctx, zmq.PUSH, 1000)
        security.connect(self._socket, endpoint, curve)
        self._process, self._unit, self._current = process, unit, current
        self._pid = os.getpid()
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stage, seq = getattr(record, "stage", None), getattr(record, "seq", None)
            if stage is None and (current := self._current()) is not None:
                stage, seq = current[0], current[1]
            report = status.LogRecord(
                self._process,
                self._pid,
                record.name,
                record.levelno,
                record.getMessage()[: status.MAX_TEXT],
                stage or self._unit,
                seq if isinstance(seq, int) else -1,
                _traceback(record)[-status.MAX_TEXT :],
                record.created,
            )
            self._socket.send_multipart(status.pack_log(report), zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._socket.close(linger=0)
        super().close()


def _traceback(record: logging.LogRecord) -> str:
    if record.exc_info and record.exc_info[0] is not None:
        return "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    return record.exc_text or ""


class Below(logging.Filter):
    """Passes records below ``level``: those that are not forwarded."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self._level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self._level


def to_stderr(name: str, level: int, *, force: bool = False) -> Repeats:
    """Log lines on stderr in the format of this package's processes (``name``: the role,
    and the pid), floods summarised; flush the returned Repeats at the end."""
    logging.basicConfig(level=level, format=child.log_format(name), force=force)
    repeats = Repeats()
    for handler in logging.getLogger().handlers:
        handler.setLevel(level)
        handler.addFilter(repeats)
    return repeats


def forward(
    ctx: zmq.Context[Any],
    endpoint: str,
    curve: security.Curve | None,
    level: int,
    **who: Any,
) -> Forwarder:
    """From now on, records at or above ``level`` go to the orchestrator (``Forwarder``,
    given ``who``), no longer to stderr; flush its ``repeats``, then remove and close the
    returned handler at the end."""
    root = logging.getLogger()
    for handler in root.handlers:
        handler.filters.insert(0, Below(level))  # before Repeats, which counts what passes
    forwarder = Forwarder(ctx, endpoint, curve, level=level, **who)
    root.addHandler(forwarder)
    root.setLevel(min(root.level, level))
    return forwarder
