"""The status link: what a worker's watchdog thread tells the orchestrator about a stage
call that runs long, while the worker's main thread is still inside it (the control
channel is the main thread's, so it cannot answer then). Every orchestrated worker's
watchdog connects a PUSH to the orchestrator's PULL "status"; a message is
``[kind, *codec frames of the report's fields]``.
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
KINDS = (RUNNING, DONE, DEADLINE)

MAX_BYTES = 64 * 1024  # a report is a few dozen bytes


@dataclass(frozen=True)
class Report:
    process: int  # the worker's index in the plan's processes
    pid: int
    path: str  # the stage's profile path
    seq: int  # the item's sequence number
    running: float  # seconds the call has run so far (DONE: in all, to within a check)
    stalled: bool  # it has run past its stall_after (DONE: it was reported so)
    limit: float  # RUNNING: its stall_after; DEADLINE: its deadline; DONE: its stall_after


_TYPES = (int, int, str, int, float, bool, float)


def pack(kind: bytes, report: Report) -> list[Any]:
    return [kind, *codec.encode(list(astuple(report)))]


def unpack(message: Sequence[bytes]) -> tuple[bytes, Report]:
    """(kind, report) from a status message; DecodeError for anything else."""
    if len(message) != 2 or message[0] not in KINDS:
        raise DecodeError("not a status message")
    fields = codec.decode(message[1:], max_message_bytes=MAX_BYTES)
    if not isinstance(fields, list) or len(fields) != len(_TYPES):
        raise DecodeError("a status report has 7 fields")
    for value, kind in zip(fields, _TYPES, strict=True):
        if kind is float and type(value) is int:
            continue
        if type(value) is not kind:
            raise DecodeError(f"a status report field is a {type(value).__name__}")
    return message[0], Report(*fields)
