"""The status link: what a worker's watchdog thread tells the orchestrator about a stage
call that runs long, while the worker's main thread is still inside it (the control
channel is the main thread's, so it cannot answer then), and the worker's log records
(``LOG``, from worker/logs.py). Every orchestrated worker connects PUSH sockets to the
orchestrator's PULL "status"; a message is ``[kind, *codec frames of the report's
fields]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass
from typing import Any

from pystream_zmq.errors import DecodeError
from pystream_zmq.wire import codec

# worker -> orchestrator
RUNNING = b"running"  # a stage call has run past the notice time, or past stall_after
DONE = b"done"  # a stage call reported RUNNING has returned
DEADLINE = b"deadline"  # a stage call ran past its deadline: the worker is about to end
MEMORY = b"memory"  # after an item, its resident size was over its limit: to be replaced
KINDS = (RUNNING, DONE, DEADLINE, MEMORY)
LOG = b"log"  # a log record

MAX_BYTES = 256 * 1024  # a report is a few dozen bytes; a log record's text, up to 4 bytes a
MAX_TEXT = 16 * 1024  # character: at most this many characters of message and of traceback


@dataclass(frozen=True)
class Report:
    process: int  # the worker's index in the plan's processes
    pid: int
    path: str  # the stage's profile path
    seq: int  # the item's sequence number
    running: float  # seconds the call has run so far (DONE: in all, to within a check)
    stalled: bool  # it has run past its stall_after (DONE: it was reported so)
    limit: float  # RUNNING: its stall_after; DEADLINE: its deadline; DONE: its stall_after
    # MEMORY: path is the worker's unit, seq the item it finished last, running its resident
    # size and limit its limit, both in bytes


_TYPES = (int, int, str, int, float, bool, float)


def pack(kind: bytes, report: Report) -> list[Any]:
    return [kind, *codec.encode(list(astuple(report)))]


def unpack(message: Sequence[bytes]) -> tuple[bytes, Report]:
    """(kind, report) from a status message; DecodeError for anything else."""
    if len(message) != 2 or message[0] not in KINDS:
        raise DecodeError("not a status message")
    return message[0], Report(*_fields(message[1], _TYPES))


@dataclass(frozen=True)
class LogRecord:
    process: int  # the worker's index in the plan's processes
    pid: int
    logger: str  # the name of the logger it was logged with, in the worker
    level: int
    message: str  # formatted, at most MAX_TEXT characters
    stage: str  # the stage path it is about (the unit's, when it names none)
    seq: int  # the sequence number of the item it is about, -1 for none
    traceback: str  # "" for none; its last MAX_TEXT characters
    created: float  # time.time() when it was logged


_LOG_TYPES = (int, int, str, int, str, str, int, str, float)


def pack_log(record: LogRecord) -> list[Any]:
    return [LOG, *codec.encode(list(astuple(record)))]


def unpack_log(message: Sequence[bytes]) -> LogRecord:
    """A log record from a LOG message; DecodeError for anything else."""
    if len(message) != 2 or message[0] != LOG:
        raise DecodeError("not a log message")
    return LogRecord(*_fields(message[1], _LOG_TYPES))


def _fields(frame: bytes, types: tuple[type, ...]) -> list[Any]:
    fields = codec.decode([frame], max_message_bytes=MAX_BYTES)
    if not isinstance(fields, list) or len(fields) != len(types):
        raise DecodeError(f"a status message has {len(types)} fields")
    for value, kind in zip(fields, types, strict=True):
        if kind is float and type(value) is int:
            continue
        if type(value) is not kind:
            raise DecodeError(f"a status message field is a {type(value).__name__}")
    return fields
