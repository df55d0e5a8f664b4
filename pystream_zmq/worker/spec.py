"""What an orchestrated worker is told at start: its ``WorkerSpec`` (endpoints, settings)
and its stages, written to its stdin as two length-prefixed parts: the spec pickled (it
comes from our own parent), the stages cloudpickled, so that stages defined in ``__main__``
or a notebook travel by value."""

from __future__ import annotations

import logging
import pickle
import struct
from dataclasses import dataclass, field
from typing import IO, BinaryIO

from pystream_zmq.plan import Limits
from pystream_zmq.wire import codec, formats, security, transport

_LENGTH = struct.Struct("<Q")


@dataclass
class WorkerSpec:
    name: str  # the unit's profile path, used in logs
    pull: str  # endpoint this worker binds for its input
    push: str  # endpoint it connects to for its output
    profile: str | None  # where profile events go; None when profiling is off
    hwm: int = transport.DEFAULT_HWM
    # Orchestrated workers only: the orchestrator's control endpoint, this worker's id (its
    # profile records name it), the token its READY shows (fresh for every process: the
    # orchestrator trusts a control connection only once it has shown it), CURVE for the
    # control channel (always over tcp), and the orchestrator's sys.path. control is None
    # for a standalone worker.
    control: str | None = None
    ident: bytes = b""
    token: bytes = b""
    control_curve: security.Curve | None = None
    sys_path: list[str] = field(default_factory=list)
    log_level: int = logging.INFO  # what goes to stderr
    # Orchestrated workers: records at or above it go to the orchestrator's logging instead.
    forward_log_level: int = logging.WARNING
    raise_on: frozenset[str] = frozenset()  # stage paths whose errors go to the user
    ipc_dir: str | None = None  # the orchestrator's socket directory: removed if orphaned
    # Received messages over this many bytes are refused: by ZeroMQ (MAXMSGSIZE, per frame,
    # before any allocation; it drops the sender's connection) and by the codec (in total).
    max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES
    # "block": take items in order; "latest": read all that waits, process only the newest.
    drop_policy: str = transport.BLOCK
    max_age: float | None = None  # seconds after the source sent it; older items are dropped
    # Replicas: more input endpoints (one per upstream replica), merged in sequence order
    # when ordered_input; more output endpoints (one per downstream replica).
    more_pulls: tuple[str, ...] = ()
    more_pushes: tuple[str, ...] = ()
    ordered_input: bool = False
    first_seq: int | None = 0  # None for a restarted worker: it joins mid-stream
    replica: int | None = None  # which replica of its stage, for per-replica counters
    curve: security.Curve | None = None  # CURVE on every socket; None: plaintext
    cpu: int | None = None  # pin_cpus: the CPU this process runs on
    native_threads: int | None = None  # its native thread pools' size; None: left alone
    # Orchestrated: where the watchdog reports a stage call that runs long (a PUSH to the
    # orchestrator's "status" link), and this process's index in the plan, which it names.
    status: str | None = None
    process: int = -1
    limits: dict[str, Limits] = field(default_factory=dict)  # {leaf path: its limits}
    # Orchestrated over ipc: the pipeline's shared-memory pools (pystream_zmq.shm), the
    # descriptor of pool n at index n (inherited, same numbers); the pool this process
    # sends into, and the smallest array that goes there. It reads every pool.
    shm_fds: tuple[int, ...] = ()
    shm_sends: int | None = None
    shm_min_bytes: int = 64 * 1024
    # Standalone only (pystream-worker --input-format/--output-format): a link to a program
    # outside PyStream, in msgpack-numpy's layout; see wire/formats.py.
    input_format: str = formats.PYSTREAM
    output_format: str = formats.PYSTREAM


def write_spec(stream: IO[bytes], spec: WorkerSpec, stages_blob: bytes) -> None:
    for part in (pickle.dumps(spec), stages_blob):
        stream.write(_LENGTH.pack(len(part)))
        stream.write(part)
    stream.flush()


def read_part(stream: BinaryIO) -> bytes:
    (size,) = _LENGTH.unpack(stream.read(_LENGTH.size))
    return stream.read(size)


def read_spec(stream: BinaryIO) -> tuple[WorkerSpec, bytes]:
    """The spec and the stages blob, as ``write_spec`` wrote them."""
    spec: WorkerSpec = pickle.loads(read_part(stream))
    return spec, read_part(stream)
