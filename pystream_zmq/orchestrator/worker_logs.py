"""The workers' log records (worker/logs.py), logged again in this process: under the
logger ``pystream_zmq.stages.<stage path>``, with ``__`` turned into dots
(``pystream_zmq.stages.MainPipeline.Child.StageA``), so that a user can filter a stage or a
whole child pipeline, with the worker's pid, the item's sequence number and the remote
traceback on the record (``stage``, ``seq``, ``worker_pid``, ``worker_logger``; the
traceback as ``exc_text``, which every formatter prints)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from pystream_zmq.errors import DecodeError
from pystream_zmq.throttle import Throttled
from pystream_zmq.wire import status

log = logging.getLogger(__name__)

ROOT = "pystream_zmq.stages"
_OURS = "pystream_zmq"


def logger_for(path: str) -> logging.Logger:
    """The logger a stage's records come out of, for ``path`` (``MainPipeline__Stage1``)."""
    return logging.getLogger(f"{ROOT}.{path.replace('__', '.')}")


class WorkerLogs:
    """Takes LOG messages from the status link (in the collector's thread). A record from a
    process that is not, or no longer, one of ours is ignored and counted (``ignored``)."""

    def __init__(self, names: Sequence[str], pid_of: Callable[[int], int | None]) -> None:
        self._names = names
        self._pid_of = pid_of
        self.ignored = 0
        self._warn_malformed = Throttled(
            log, logging.WARNING, "ignored a malformed log record from a worker: %s"
        )

    def take(self, message: list[bytes]) -> None:
        try:
            remote = status.unpack_log(message)
        except DecodeError as e:
            self.ignored += 1
            self._warn_malformed(e)
            return
        if not 0 <= remote.process < len(self._names) or self._pid_of(remote.process) != remote.pid:
            self.ignored += 1
            return
        logger = logger_for(remote.stage)
        if not logger.isEnabledFor(remote.level):
            return
        message_text = remote.message
        if not remote.logger.startswith(_OURS):  # the user's own: say whose it is
            message_text = f"{remote.stage}: {message_text}"
        record = logger.makeRecord(logger.name, remote.level, "(worker)", 0, message_text, (), None)
        record.created = remote.created
        record.msecs = (remote.created - int(remote.created)) * 1000
        record.process = remote.pid
        record.processName = f"worker of {self._names[remote.process]}"
        record.exc_text = remote.traceback or None
        record.stage = remote.stage
        record.seq = remote.seq if remote.seq >= 0 else None
        record.worker_pid = remote.pid
        record.worker_logger = remote.logger
        logger.handle(record)
