"""The runs of a profile database: what a run is called, the list of runs (``pystream
profile --list``), and removing a run that recorded nothing.

A run's name is separate from its profile paths: those always start at ``MainPipeline``
(PyStream's keys), whatever the run is called.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

from pystream_zmq.profiling import schema
from pystream_zmq.profiling.report import open_db
from pystream_zmq.stage import MAIN_PIPELINE_NAME

log = logging.getLogger(__name__)


def default_run_name() -> str:
    """The running script's name: ``demo`` for ``python scripts/demo.py``, the package for
    ``python -m package``; MAIN_PIPELINE_NAME where there is no script (an interactive
    session, a notebook, ``python -c``)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path:
        return MAIN_PIPELINE_NAME
    script = Path(path)
    name = script.parent.name if script.stem == "__main__" else script.stem
    return name or MAIN_PIPELINE_NAME


def check_run_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a run name must be a non-empty str, not {name!r}")
    return name


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """One run, as ``pystream profile --list`` shows it. ``duration``: seconds from its
    start to its last record (the final counters, written when it stops; while it runs, the
    latest snapshot), None when it has recorded nothing. ``items``: items that came out
    (MainPipeline's)."""

    run_id: int
    name: str
    mode: str
    started: float  # Unix time
    duration: float | None
    items: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def list_runs(db_path: str | Path) -> list[RunSummary]:
    """Every run in the database, oldest first; ProfileNotFoundError without one."""
    with open_db(db_path) as conn:
        has_counters = conn.execute("PRAGMA user_version").fetchone()[0] >= 2
        runs = conn.execute("SELECT run_id, pipeline, mode, started FROM runs ORDER BY run_id")
        return [
            _summary(conn, run_id, name, mode, started, has_counters)
            for run_id, name, mode, started in runs.fetchall()
        ]


def _summary(
    conn: sqlite3.Connection, run_id: int, name: str, mode: str, started: float, counters: bool
) -> RunSummary:
    # Both read through an index: (run_id, path) of events, the counters' primary key.
    items = conn.execute(
        "SELECT count(*) FROM events WHERE run_id = ? AND path = ?", (run_id, MAIN_PIPELINE_NAME)
    ).fetchone()[0]
    last = None
    if counters:
        query = "SELECT max(updated) FROM counters WHERE run_id = ?"
        last = conn.execute(query, (run_id,)).fetchone()[0]
    if last is None:  # no counters (schema 1, or none recorded yet): the last item's end
        query = 'SELECT max("end") FROM events WHERE run_id = ? AND path = ?'
        last = conn.execute(query, (run_id, MAIN_PIPELINE_NAME)).fetchone()[0]
    duration = None if last is None else max(0.0, last - started)
    return RunSummary(run_id, name, mode, started, duration, items)


def delete_if_empty(db_path: Path, run_id: int) -> bool:
    """Delete the run if it holds no events (a pipeline started, then taken into another's
    run before any item went through); whether it was deleted."""
    if not db_path.exists():
        return False
    try:
        with closing(schema.connect(db_path, schema.BUSY_TIMEOUT)) as conn:
            return schema.delete_run(conn, run_id, only_if_empty=True)
    except sqlite3.Error as e:  # an empty run left behind is no reason to stop
        log.warning("could not delete the empty profile run %d: %s", run_id, e)
        return False
