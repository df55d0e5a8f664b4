"""Profile records: where the SQLite database lives, and the one thread that writes to it.

A database keeps the newest ``keep_runs()`` runs: starting a run deletes the older ones.
The tables are in ``schema``, the wire format of event batches in ``events`` and PyStream's
summary of a run in ``summary``.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pystream_zmq.profiling import schema
from pystream_zmq.stage import MAIN_PIPELINE_NAME, Event

log = logging.getLogger(__name__)

PROFILE_DIR_ENV = "PYSTREAM_PROFILE_DIR"
DB_FILENAME = "profiles.sqlite3"
KEEP_RUNS_ENV = "PYSTREAM_PROFILE_KEEP_RUNS"
DEFAULT_KEEP_RUNS = 100

Counters = Mapping[str, Mapping[str, int]]  # {path: {name: value}}

# MainPipeline counters that say a run's records are incomplete (profiles.md, "Schema")
WRITER_RESTARTS = "profile_writer_restarts"  # profile writer processes that died, restarted
EVENTS_LOST = "profile_events_lost"  # events sent to the writer that it never accounted for
WRITER_FAILED = "profile_writer_failed"  # 1: the last writer died and was not restarted
# A worker's memory, in bytes, as it reports it (worker/memory.py), and its restarts, which
# the orchestrator records under the worker's path: in all, and those for its memory limit
RSS = "rss_bytes"
RSS_PEAK = "rss_peak_bytes"
RESTARTS = "restarts"
MEMORY_RESTARTS = "memory_restarts"

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


# -- writing ---------------------------------------------------------------------------------
_WRITER_BUSY_TIMEOUT = 1.0  # short, so the writer notices close() while the DB is locked
_RETRY_DELAY = 0.05

# (run_id, events, counters): one of the two is empty
_Batch = tuple[int, Sequence[Event], Counters]


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
        """``start_run`` in this writer's database, then start the writer thread."""
        if self._closed:
            raise RuntimeError("this ProfileWriter is closed")
        run_id = start_run(self._db_path, pipeline, mode, stages, keep=self._keep_runs)
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
            conn = schema.connect(self._db_path, _WRITER_BUSY_TIMEOUT)
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
                counts = [(*key, value, now) for key, value in counter_rows.items()]
                schema.write(conn, rows, counts)
                written = True
                break
            except sqlite3.OperationalError as e:
                if not schema.is_busy(e) or self._stop.is_set():
                    log.error("dropping %d profile events: %s", count, e)
                    break
                if not warned:
                    log.warning("profile database is locked; retrying (new batches may drop)")
                    warned = True
                self._stop.wait(_RETRY_DELAY)
            except Exception:  # a bad event or a broken DB must not kill the thread
                log.exception("dropping %d profile events", count)
                break
        with self._cond:
            if written:
                self._written += count
            else:
                self._dropped += count
            self._done += len(group)
            self._cond.notify_all()


def start_run(
    db_path: Path,
    pipeline: str,
    mode: str,
    stages: Sequence[tuple[str, str]],
    *,
    keep: int | None = None,
) -> int:
    """Record a new run and its stages (display order; the first is the main pipeline),
    creating or migrating the schema if needed, delete the oldest runs beyond ``keep``
    (default: keep_runs()), and return the new run_id. Starts no writer: whoever runs the
    stages stores the records (a writer thread, or the writer process)."""
    if mode not in ("serial", "parallel"):
        raise ValueError(f"mode must be 'serial' or 'parallel', not {mode!r}")
    if not stages or tuple(stages[0]) != (MAIN_PIPELINE_NAME, "pipeline"):
        raise ValueError(f"the first stage must be ({MAIN_PIPELINE_NAME!r}, 'pipeline')")
    if len({path for path, _ in stages}) != len(stages):
        raise ValueError("stage paths must be unique")
    keep = keep if keep is not None else keep_runs()
    if keep < 1:
        raise ValueError("keep_runs must be at least 1")
    db_path.parent.mkdir(parents=True, exist_ok=True)
    return schema.create_run(db_path, pipeline, mode, stages, keep)


def count_events(db_path: Path, run_id: int) -> int:
    """How many events of the run the database holds (committed ones only)."""
    with closing(schema.connect(db_path, schema.BUSY_TIMEOUT)) as conn:
        row = conn.execute("SELECT count(*) FROM events WHERE run_id = ?", (run_id,)).fetchone()
    return int(row[0])


def record_counters(db_path: Path, run_id: int, counters: Counters) -> None:
    """Set counters of a run in one transaction of its own, for a process that has no
    writer thread (an orchestrator whose writer process is gone); raises sqlite3.Error."""
    now = time.time()
    rows = [
        (run_id, path, name, value, now)
        for path, values in counters.items()
        for name, value in values.items()
    ]
    with closing(schema.connect(db_path, schema.BUSY_TIMEOUT)) as conn:
        schema.write(conn, [], rows)


@dataclass(frozen=True)
class ProfileRun:
    """A run registered in a profile database (``start_run``)."""

    db_path: Path
    run_id: int

    def open_recorder(self) -> RunRecorder:
        """A writer thread of this process's own, for this run's records."""
        writer = ProfileWriter(self.db_path)
        writer.start()
        return RunRecorder(writer, self.run_id)


class Recorder(Protocol):
    """Where a runner's profile records go: a RunRecorder, or a writer process."""

    def events(self, events: list[Event]) -> bool: ...

    def counters(self, counters: Counters) -> bool: ...

    @property
    def dropped_events(self) -> int: ...


class RunRecorder:
    """What a runner records for one run: event batches and counter snapshots.
    ``dropped_before``: events of the run dropped by writers before this one (a profile
    writer process that replaced one that died)."""

    def __init__(self, writer: ProfileWriter, run_id: int, *, dropped_before: int = 0) -> None:
        self.writer = writer
        self.run_id = run_id
        self._dropped_before = dropped_before

    def events(self, events: list[Event]) -> bool:
        return self.writer.submit(self.run_id, events)

    def counters(self, counters: Counters) -> bool:
        return self.writer.submit_counters(self.run_id, counters)

    @property
    def dropped_events(self) -> int:
        return self._dropped_before + self.writer.dropped_events

    def close(self, timeout: float = 5.0) -> None:
        """Store what is queued (within ``timeout``) and stop the writer thread."""
        self.writer.close(timeout)
        if self.writer.dropped_events:
            log.warning(
                "%d profile events were dropped (the database was too slow)",
                self.writer.dropped_events,
            )
