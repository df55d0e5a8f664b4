"""The profile database's tables, their version, and the SQL that writes them.

Schema (version 2, kept in ``PRAGMA user_version``; the README documents it)::

    runs(run_id INTEGER PRIMARY KEY AUTOINCREMENT, pipeline TEXT, mode TEXT, started REAL,
         pid INTEGER)
    stages(run_id, position, path, kind, PRIMARY KEY(run_id, path))  -- kind: pipeline|stage
    events(run_id, path, seq, arrive, start, "end")                  -- index on (run_id, path)
    counters(run_id, path, name, value, updated, PRIMARY KEY(run_id, path, name))

Version 1 lacked ``counters``; opening it for writing adds the table. The database uses WAL
and a busy timeout so several processes can share one file.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import cast

from pystream_zmq.errors import PyStreamError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
BUSY_TIMEOUT = 5.0  # how long starting or reading a run may wait for another process's lock

EventRow = tuple[int, str, int, float, float, float]  # run_id, path, seq, arrive, start, end
CounterRow = tuple[int, str, str, int, float]  # run_id, path, name, value, updated


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
    # the latest value of each counter, overwritten by every snapshot
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


def connect(db_path: Path, busy_timeout: float) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves.
    return sqlite3.connect(db_path, timeout=busy_timeout, isolation_level=None)


def create_run(
    db_path: Path, pipeline: str, mode: str, stages: Sequence[tuple[str, str]], keep: int
) -> int:
    """Record a new run and its stages, creating or migrating the schema if needed, delete
    all but the newest ``keep`` runs, and return the new run_id."""
    with closing(connect(db_path, BUSY_TIMEOUT)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")  # persistent; not allowed in a transaction
        conn.execute("BEGIN IMMEDIATE")  # serialises schema creation between processes
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ProfileSchemaError(
                    f"{db_path} has schema version {version}; this pystream_zmq "
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
    return run_id


def write(
    conn: sqlite3.Connection, events: Sequence[EventRow], counters: Sequence[CounterRow]
) -> None:
    """Insert events and set counters in one transaction; on any error it is rolled back
    and the error raised."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(_INSERT_EVENT, events)
        conn.executemany(_UPSERT_COUNTER, counters)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def delete_run(conn: sqlite3.Connection, run_id: int, *, only_if_empty: bool = False) -> bool:
    """Delete a run's rows in one transaction (``only_if_empty``: only when it has no
    events); whether it was deleted."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        has_events = conn.execute("SELECT 1 FROM events WHERE run_id = ? LIMIT 1", (run_id,))
        if only_if_empty and has_events.fetchone() is not None:
            conn.execute("ROLLBACK")
            return False
        for table in _RUN_TABLES:  # names from _RUN_TABLES, never from input
            conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return True


def is_busy(error: sqlite3.OperationalError) -> bool:
    """Whether another connection holds the lock (worth a retry)."""
    # SQLITE_BUSY / SQLITE_LOCKED; sqlite_errorcode exists from Python 3.11 on
    return getattr(error, "sqlite_errorcode", None) in (5, 6) or "locked" in str(error)


def _delete_old_runs(conn: sqlite3.Connection, keep: int) -> None:
    # Table names come from _RUN_TABLES, never from input.
    for table in _RUN_TABLES:
        conn.execute(
            f"DELETE FROM {table} WHERE run_id NOT IN"
            " (SELECT run_id FROM runs ORDER BY run_id DESC LIMIT ?)",
            (keep,),
        )


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        log.exception("rollback of the profile database failed")
