"""Profile records: where the SQLite database lives, the wire format of event batches, the
single writer thread, and PyStream's latency/throughput summary.

An event is ``(path, seq, arrive, start, end)``: the stage's profile path, the item's
sequence number, and time.time() when the worker received the item and around the stage call.

Schema (version 2, kept in ``PRAGMA user_version``; the README documents it)::

    runs(run_id INTEGER PRIMARY KEY AUTOINCREMENT, pipeline TEXT, mode TEXT, started REAL,
         pid INTEGER)
    stages(run_id, position, path, kind, PRIMARY KEY(run_id, path))  -- kind: pipeline|stage
    events(run_id, path, seq, arrive, start, "end")                  -- index on (run_id, path)
    counters(run_id, path, name, value, updated, PRIMARY KEY(run_id, path, name))  -- v2

Version 1 lacked ``counters``; opening it for writing adds the table. The database uses WAL
and a busy timeout so several processes can share one file. Starting a run deletes all but
the newest ``keep_runs()`` runs.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import sqlite3
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Protocol, cast

import msgpack
import numpy as np

from pystream_zmq.errors import DecodeError, PyStreamError
from pystream_zmq.stage import MAIN_PIPELINE_NAME, PATH_SEPARATOR, Event

log = logging.getLogger(__name__)

PROFILE_DIR_ENV = "PYSTREAM_PROFILE_DIR"
DB_FILENAME = "profiles.sqlite3"
KEEP_RUNS_ENV = "PYSTREAM_PROFILE_KEEP_RUNS"
DEFAULT_KEEP_RUNS = 100
SCHEMA_VERSION = 2

Counters = Mapping[str, Mapping[str, int]]  # {path: {name: value}}

_db_folder: str | None = None  # PyStream's API is a module-level setting


def set_profiler_db_folder(path: str | os.PathLike[str]) -> None:
    """Use ``path`` (made absolute now) for pipelines created from now on."""
    global _db_folder
    _db_folder = os.path.abspath(os.fspath(path))


def get_profiler_db_folder() -> str:
    """The folder set by set_profiler_db_folder(), else $PYSTREAM_PROFILE_DIR, else
    $XDG_STATE_HOME/pystream_zmq, else ~/.local/state/pystream_zmq (read at each call)."""
    if _db_folder is not None:
        return _db_folder
    if env := os.environ.get(PROFILE_DIR_ENV):
        return env
    state = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):  # the XDG spec says to ignore relative paths
        state = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "pystream_zmq")


def keep_runs() -> int:
    """How many runs a database keeps: $PYSTREAM_PROFILE_KEEP_RUNS (read at each call), else
    DEFAULT_KEEP_RUNS."""
    value = os.environ.get(KEEP_RUNS_ENV, "")
    if not value:
        return DEFAULT_KEEP_RUNS
    try:
        keep = int(value)
    except ValueError:
        keep = 0
    if keep < 1:
        raise ValueError(f"${KEEP_RUNS_ENV} must be a whole number >= 1, not {value!r}")
    return keep


def profiler_db_path() -> Path:
    """The database file in get_profiler_db_folder(), creating the folder."""
    folder = Path(get_profiler_db_folder())
    folder.mkdir(parents=True, exist_ok=True)
    return folder / DB_FILENAME


# -- wire format -----------------------------------------------------------------------------
# msgpack [format, paths, path index, seq, arrive, start, end]: a path table plus one
# little-endian binary column per field. A column costs one C call to pack and to unpack, and
# its element types are exact by construction, so unpacking need not check every value.
_FORMAT = 1
_DTYPES = ("<u4", "<i8", "<f8", "<f8", "<f8")


def pack_events(events: Sequence[Event]) -> bytes:
    """Encode a batch of events for the profile socket (see unpack_events)."""
    index: dict[str, int] = {}
    paths, *columns = zip(*events, strict=True) if events else [()] * 5
    numbers = [[index.setdefault(path, len(index)) for path in paths], *columns]
    binary = [np.array(col, dtype).tobytes() for dtype, col in zip(_DTYPES, numbers, strict=True)]
    return msgpack.packb([_FORMAT, list(index), *binary], use_bin_type=True)


def unpack_events(data: bytes | memoryview) -> list[Event]:
    """Decode bytes from pack_events. Untrusted input: any problem raises DecodeError."""
    try:
        size = len(data)
        message = msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_str_len=size, max_bin_len=size,
            max_array_len=size, max_map_len=size, max_ext_len=size,
        )  # fmt: skip
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise DecodeError(f"profile events are not valid msgpack: {e}") from e
    if type(message) is not list or len(message) != 7 or message[0] != _FORMAT:
        raise DecodeError("profile events: expected [1, paths, 5 columns]")
    version, paths, *binary = message
    if type(version) is not int:  # True == 1 too
        raise DecodeError("profile events: bad format tag")
    if type(paths) is not list or any(type(path) is not str for path in paths):
        raise DecodeError("profile events: paths must be a list of str")
    if any(type(col) is not bytes for col in binary):
        raise DecodeError("profile events: columns must be binary")
    try:
        index, *columns = (np.frombuffer(b, t) for t, b in zip(_DTYPES, binary, strict=True))
    except ValueError as e:  # not a whole number of values
        raise DecodeError(f"profile events: {e}") from e
    if len({len(col) for col in binary[1:]}) != 1 or len(index) != len(columns[0]):
        raise DecodeError("profile events: columns have different lengths")
    if len(index) and index.max() >= len(paths):
        raise DecodeError("profile events: path index out of range")
    values = [col.tolist() for col in columns]
    return list(zip(map(paths.__getitem__, index.tolist()), *values, strict=True))


# -- writing ---------------------------------------------------------------------------------
class ProfileSchemaError(PyStreamError):
    """The profile database was made by a newer pystream_zmq (a higher schema version)."""


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS runs (run_id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " pipeline TEXT NOT NULL, mode TEXT NOT NULL, started REAL NOT NULL, pid INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS stages (run_id INTEGER NOT NULL REFERENCES runs,"
    " position INTEGER NOT NULL, path TEXT NOT NULL,"
    " kind TEXT NOT NULL CHECK (kind IN ('pipeline', 'stage')), PRIMARY KEY (run_id, path))",
    "CREATE TABLE IF NOT EXISTS events (run_id INTEGER NOT NULL, path TEXT NOT NULL,"
    ' seq INTEGER NOT NULL, arrive REAL, start REAL NOT NULL, "end" REAL NOT NULL)',
    "CREATE INDEX IF NOT EXISTS events_run_path ON events (run_id, path)",
    # v2: the latest value of each counter, overwritten by every snapshot
    "CREATE TABLE IF NOT EXISTS counters (run_id INTEGER NOT NULL, path TEXT NOT NULL,"
    " name TEXT NOT NULL, value INTEGER NOT NULL, updated REAL NOT NULL,"
    " PRIMARY KEY (run_id, path, name))",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)  # every statement is idempotent, so running them all migrates any older version
_INSERT_EVENT = 'INSERT INTO events (run_id, path, seq, arrive, start, "end") VALUES (?,?,?,?,?,?)'
_UPSERT_COUNTER = (
    "INSERT INTO counters (run_id, path, name, value, updated) VALUES (?,?,?,?,?)"
    " ON CONFLICT (run_id, path, name) DO UPDATE SET value = excluded.value,"
    " updated = excluded.updated"
)
_RUN_TABLES = ("events", "counters", "stages", "runs")
_START_BUSY_TIMEOUT = 5.0  # start_run may wait this long for another process's lock
_WRITER_BUSY_TIMEOUT = 1.0  # short, so the writer notices close() while the DB is locked
_RETRY_DELAY = 0.05

# (run_id, events, counters): one of the two is empty
_Batch = tuple[int, Sequence[Event], Counters]


def _is_busy(error: sqlite3.OperationalError) -> bool:
    # SQLITE_BUSY / SQLITE_LOCKED; sqlite_errorcode exists from Python 3.11 on
    return getattr(error, "sqlite_errorcode", None) in (5, 6) or "locked" in str(error)


class ProfileWriter:
    """Owns the one SQLite connection that stores events, in a daemon thread. ``submit``
    never blocks: beyond ``max_pending_batches`` unwritten batches, whole batches are dropped
    and counted. Submitted event lists must not be changed afterwards. ``keep_runs`` (default:
    keep_runs()) bounds how many runs the database keeps."""

    def __init__(self, db_path: Path, *, max_pending_batches: int = 1000,
                 commit_interval: float = 0.2, keep_runs: int | None = None) -> None:  # fmt: skip
        self._db_path = Path(db_path)
        self._keep_runs = keep_runs
        self._max_pending = max_pending_batches
        self._commit_interval = commit_interval
        self._queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._accepted = self._done = 0  # batches; their difference bounds the queue
        self._written = self._dropped = 0  # events
        self._stop = threading.Event()  # set when close() gives up waiting: drop, don't retry
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def db_path(self) -> Path:
        return self._db_path

    @property
    def written_events(self) -> int:
        return self._written

    @property
    def dropped_events(self) -> int:
        return self._dropped

    def start_run(self, pipeline: str, mode: str, stages: Sequence[tuple[str, str]]) -> int:
        """Record a new run and its stages (display order; the first is the main pipeline),
        creating or migrating the schema if needed, delete the oldest runs beyond
        ``keep_runs``, and return the new run_id."""
        if mode not in ("serial", "parallel"):
            raise ValueError(f"mode must be 'serial' or 'parallel', not {mode!r}")
        if not stages or tuple(stages[0]) != (MAIN_PIPELINE_NAME, "pipeline"):
            raise ValueError(f"the first stage must be ({MAIN_PIPELINE_NAME!r}, 'pipeline')")
        if len({path for path, _ in stages}) != len(stages):
            raise ValueError("stage paths must be unique")
        if self._closed:
            raise RuntimeError("this ProfileWriter is closed")
        keep = self._keep_runs if self._keep_runs is not None else keep_runs()
        if keep < 1:
            raise ValueError("keep_runs must be at least 1")
        self._db_path.parent.mkdir(parents=True, exist_ok=True)
        with closing(_connect(self._db_path, _START_BUSY_TIMEOUT)) as conn:
            conn.execute("PRAGMA journal_mode = WAL")  # persistent; not allowed in a transaction
            conn.execute("BEGIN IMMEDIATE")  # serialises schema creation between processes
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise ProfileSchemaError(
                        f"{self._db_path} has schema version {version}; this pystream_zmq "
                        f"writes version {SCHEMA_VERSION}. Use another profiler DB folder."
                    )
                for statement in _SCHEMA if version < SCHEMA_VERSION else ():
                    conn.execute(statement)
                cursor = conn.execute(
                    "INSERT INTO runs (pipeline, mode, started, pid) VALUES (?, ?, ?, ?)",
                    (pipeline, mode, time.time(), os.getpid()),
                )
                run_id = cast(int, cursor.lastrowid)  # never None after an INSERT
                conn.executemany(
                    "INSERT INTO stages (run_id, position, path, kind) VALUES (?, ?, ?, ?)",
                    [(run_id, pos, path, kind) for pos, (path, kind) in enumerate(stages)],
                )
                _delete_old_runs(conn, keep)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        self.start()
        return run_id

    def start(self) -> None:
        """Start the writer thread (start_run does); call it directly to write events of a
        run that another ProfileWriter started. Idempotent."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="pystream-profile-writer", daemon=True
                )
                self._thread.start()

    def submit(self, run_id: int, events: Sequence[Event]) -> bool:
        """Queue events for writing; False (and counted as dropped) if the queue is full."""
        with self._cond:
            running = self._thread is not None and not self._closed
            if not running or self._accepted - self._done >= self._max_pending:
                self._dropped += len(events)
                return False
            self._accepted += 1
        self._queue.put((run_id, events, {}))
        return True

    def submit_counters(self, run_id: int, counters: Counters) -> bool:
        """Queue a snapshot of counters ({path: {name: value}}; each value replaces the one
        stored); False if the queue is full (a later snapshot replaces it anyway)."""
        snapshot = {path: dict(values) for path, values in counters.items()}
        with self._cond:
            running = self._thread is not None and not self._closed
            if not running or self._accepted - self._done >= self._max_pending:
                return False
            self._accepted += 1
        self._queue.put((run_id, [], snapshot))
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far is committed (or dropped by an error)."""
        with self._cond:
            target = self._accepted
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Flush, stop the thread and close its connection, within ``timeout``. Idempotent."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._closed:
                return
            self._closed = True  # later submits are dropped
        if self._thread is None:
            return
        if not self.flush(timeout):
            self._stop.set()
            log.warning("profile writer did not finish in %.1f s; dropping the rest", timeout)
        self._queue.put(None)
        self._thread.join(max(0.0, deadline - time.monotonic()))

    # -- writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        conn = None
        try:
            conn = _connect(self._db_path, _WRITER_BUSY_TIMEOUT)
            conn.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; profiles are not precious
        except sqlite3.Error:
            log.exception("cannot open profile database %s; events will be dropped", self._db_path)
        try:
            stopping = False
            while not stopping:
                group, stopping = self._next_group()
                self._write(conn, group)
        finally:
            if conn is not None:
                conn.close()

    def _next_group(self) -> tuple[list[_Batch], bool]:
        """Block for a batch, then take what is queued, for up to commit_interval seconds."""
        group: list[_Batch] = []
        item = self._queue.get()
        deadline = time.monotonic() + self._commit_interval
        while item is not None:
            group.append(item)
            if time.monotonic() >= deadline and not self._stop.is_set():
                return group, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return group, False
        return group, True

    def _write(self, conn: sqlite3.Connection | None, group: list[_Batch]) -> None:
        """One transaction for the group; retry while the DB is locked. Never raises."""
        count = sum(len(events) for _, events, _ in group)
        now = time.time()
        counter_rows = {  # the latest snapshot of each counter wins
            (run_id, path, name): value
            for run_id, _, counters in group
            for path, values in counters.items()
            for name, value in values.items()
        }
        written = False
        warned = False
        while conn is not None and (count or counter_rows):
            try:
                rows = [(run_id, *event) for run_id, events, _ in group for event in events]
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(_INSERT_EVENT, rows)
                conn.executemany(
                    _UPSERT_COUNTER, [(*key, value, now) for key, value in counter_rows.items()]
                )
                conn.execute("COMMIT")
                written = True
                break
            except sqlite3.OperationalError as e:
                _rollback(conn)
                if not _is_busy(e) or self._stop.is_set():
                    log.error("dropping %d profile events: %s", count, e)
                    break
                if not warned:
                    log.warning("profile database is locked; retrying (new batches may drop)")
                    warned = True
                self._stop.wait(_RETRY_DELAY)
            except Exception:  # a bad event or a broken DB must not kill the thread
                _rollback(conn)
                log.exception("dropping %d profile events", count)
                break
        with self._cond:
            if written:
                self._written += count
            else:
                self._dropped += count
            self._done += len(group)
            self._cond.notify_all()


class Recorder(Protocol):
    """Where a runner's profile records go: a RunRecorder, or a writer process."""

    def events(self, events: list[Event]) -> bool: ...

    def counters(self, counters: Counters) -> bool: ...

    @property
    def dropped_events(self) -> int: ...


class RunRecorder:
    """What a runner records for one run: event batches and counter snapshots."""

    def __init__(self, writer: ProfileWriter, run_id: int) -> None:
        self.writer = writer
        self.run_id = run_id

    def events(self, events: list[Event]) -> bool:
        return self.writer.submit(self.run_id, events)

    def counters(self, counters: Counters) -> bool:
        return self.writer.submit_counters(self.run_id, counters)

    @property
    def dropped_events(self) -> int:
        return self.writer.dropped_events


def _delete_old_runs(conn: sqlite3.Connection, keep: int) -> None:
    # Table names come from _RUN_TABLES, never from input.
    for table in _RUN_TABLES:
        conn.execute(
            f"DELETE FROM {table} WHERE run_id NOT IN"
            " (SELECT run_id FROM runs ORDER BY run_id DESC LIMIT ?)",
            (keep,),
        )


def _connect(db_path: Path, busy_timeout: float) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves.
    return sqlite3.connect(db_path, timeout=busy_timeout, isolation_level=None)


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        log.exception("rollback of the profile database failed")


# -- reading ---------------------------------------------------------------------------------
_Row = tuple[int, float, float]  # seq, start, end


def read_profiles(db_path: Path, run_id: int) -> tuple[dict[str, float], dict[str, float]]:
    """PyStream's (latency in s, throughput in items/s) per path, in display order.

    Latency is the mean of end - start; throughput the mean of 1 / (end_i - end_{i-1}) over
    items sorted by end, skipping zero intervals. A pipeline path without events of its own
    gets one derived event per seq from its descendants (min start, max end). A path with no
    events gets nan for both, with one event nan throughput. An unknown run_id (or a missing
    database) gives ({}, {}).
    """
    if not Path(db_path).exists():
        return {}, {}
    uri = Path(db_path).resolve().as_uri() + "?mode=ro"
    with closing(sqlite3.connect(uri, uri=True, timeout=_START_BUSY_TIMEOUT)) as conn:
        if conn.execute("PRAGMA user_version").fetchone()[0] < 1:
            return {}, {}
        stages = conn.execute(
            "SELECT path, kind FROM stages WHERE run_id = ? ORDER BY position", (run_id,)
        ).fetchall()
        by_path: dict[str, list[_Row]] = defaultdict(list)
        rows = conn.execute(
            'SELECT path, seq, start, "end" FROM events WHERE run_id = ?', (run_id,)
        )
        for path, seq, start, end in rows:
            by_path[path].append((seq, start, end))
    latency: dict[str, float] = {}
    throughput: dict[str, float] = {}
    for path, kind in stages:
        events = by_path.get(path, [])
        if kind == "pipeline" and not events:
            events = _derive(path, by_path)
        latency[path], throughput[path] = _summarise([(s, e) for _, s, e in events])
    return latency, throughput


def _derive(path: str, by_path: dict[str, list[_Row]]) -> list[_Row]:
    """One event per seq spanning all descendants' events: (seq, min start, max end)."""
    spans: dict[int, tuple[float, float]] = {}
    prefix = path + PATH_SEPARATOR
    for child, events in by_path.items():
        if child.startswith(prefix):
            for seq, start, end in events:
                first, last = spans.get(seq, (start, end))
                spans[seq] = (min(first, start), max(last, end))
    return [(seq, start, end) for seq, (start, end) in spans.items()]


def _summarise(events: list[tuple[float, float]]) -> tuple[float, float]:
    if not events:
        return float("nan"), float("nan")
    latency = statistics.fmean(end - start for start, end in events)
    ends = sorted(end for _, end in events)
    rates = [1.0 / (b - a) for a, b in itertools.pairwise(ends) if b > a]
    return latency, statistics.fmean(rates) if rates else float("nan")
