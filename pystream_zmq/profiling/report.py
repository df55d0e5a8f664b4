"""The profile report: per stage path, item count, latency percentiles, queue wait versus
compute, throughput, drops and errors, read from the profile database (schema 1 or 2).

Per item and stage: compute = end - start; queue wait = start - the end of the previous stage
for the same item (for the first stage: the time the source sent it), i.e. transit plus time
spent waiting before the stage started. When that previous event is missing (its batch was
dropped, or it predates a ``since`` window), the wait is measured from the item's arrival at
the worker instead. A pipeline path (``MainPipeline``, a child pipeline) counts as compute
the sum of its stages' compute for the item, and the rest of its latency as queue wait.
"""

from __future__ import annotations

import dataclasses
import math
import sqlite3
from collections import defaultdict
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pystream_zmq.errors import PyStreamError
from pystream_zmq.profiling.store import (
    EVENTS_LOST,
    MEMORY_RESTARTS,
    RSS,
    RSS_PEAK,
    WRITER_FAILED,
    WRITER_RESTARTS,
)
from pystream_zmq.stage import MAIN_PIPELINE_NAME, PATH_SEPARATOR, REPLICA_MARK

_Array = npt.NDArray[np.float64]
_ERROR_COUNTERS = ("stage_errors", "decode_errors", "encode_errors")
# backpressure, drop policy, deadline, and what a standalone worker let go when it stopped
_DROP_COUNTERS = ("refused", "replaced", "expired", "discarded")
_BUSY_TIMEOUT = 5.0


class ProfileNotFoundError(PyStreamError):
    """The profile database or the requested run does not exist."""


@dataclasses.dataclass(frozen=True)
class StageReport:
    """One stage path's figures; times in seconds, nan when there were no items.

    ``dropped``: items dropped by backpressure or by a drop policy where they happened
    (``refused``: forward() returned False; ``replaced``: a newer item replaced them under
    ``drop_policy="latest"``; ``expired``: older than ``max_age``; ``discarded``: taken in,
    then let go by a stop); on ``MainPipeline``, all of the run's. ``errors``: items
    dropped because a stage raised or data could not be decoded or encoded
    (``MainPipeline``: all of the run's). ``dropped_events``: profile
    records lost because the database or the collector was too slow (the items themselves
    went on).

    ``rss_bytes``: the resident memory of the path's worker as last reported (its replicas'
    summed; ``MainPipeline``: every worker's), ``rss_peak_bytes`` the highest any one of
    them reached (a restarted worker's count from its restart); None for a path without a
    worker of its own (a stage of a serialized child pipeline, a serial run).
    ``memory_restarts``: how often its worker was replaced for passing ``max_memory_mb``.
    """

    path: str
    kind: str  # "pipeline" or "stage"
    items: int
    latency_mean: float
    latency_p50: float
    latency_p95: float
    latency_p99: float
    queue_wait_mean: float
    queue_wait_p95: float
    compute_mean: float
    compute_p95: float
    throughput: float  # items/s: (items - 1) / (last end - first end)
    dropped: int
    errors: int
    dropped_events: int
    counters: dict[str, int]  # the counters recorded for this path (summed over replicas)
    replicas: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # "N": its own
    rss_bytes: int | None = None
    rss_peak_bytes: int | None = None
    memory_restarts: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: nan becomes None."""
        return {
            key: None if isinstance(value, float) and math.isnan(value) else value
            for key, value in dataclasses.asdict(self).items()
        }


@dataclasses.dataclass(frozen=True)
class ProfileReport:
    """A run's report. ``complete`` is False when records of the run are missing:
    ``missing`` counts those known (dropped because the writer could not keep up, and lost
    with a profile writer that died); ``writer_restarts``: how many times the profile writer
    died and was restarted; ``writer_failed``: the last one died and was not restarted, so
    what came after is missing too."""

    db_path: str
    run_id: int
    pipeline: str
    mode: str
    started: float  # Unix time
    stages: list[StageReport]  # display order; MainPipeline first
    complete: bool = True
    missing: int = 0
    writer_restarts: int = 0
    writer_failed: bool = False

    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**fields, "stages": [stage.to_dict() for stage in self.stages]}

    def warning(self) -> str | None:
        """One line saying which records are missing; None when the report is complete."""
        if self.complete:
            return None
        main = self.stages[0].counters if self.stages else {}
        lost = main.get(EVENTS_LOST, 0)
        dropped = self.missing - lost
        reasons = []
        if self.writer_restarts:
            times = "time" if self.writer_restarts == 1 else "times"
            reasons.append(f"the profile writer died and was restarted {self.writer_restarts} "
                           f"{times}, losing {lost} events")  # fmt: skip
        elif lost:
            reasons.append(f"{lost} events never reached the profile writer")
        if self.writer_failed:
            reasons.append("the last profile writer died and was not restarted: later "
                           "records are missing")  # fmt: skip
        if dropped:
            reasons.append(f"{dropped} events were dropped (the profile writer fell behind)")
        return f"warning: this profile is incomplete: {'; '.join(reasons)}"


@dataclasses.dataclass
class Timings:
    """One path's items (one row each): sequence numbers, latency, queue wait, compute, end."""

    seq: npt.NDArray[np.int64]
    latency: _Array
    wait: _Array
    compute: _Array
    end: _Array


@contextmanager
def open_db(db_path: str | Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection; ProfileNotFoundError if there is no profile database."""
    path = Path(db_path)
    if not path.is_file():
        raise ProfileNotFoundError(f"no profile database at {path}")
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT)
        with closing(conn):
            if conn.execute("PRAGMA user_version").fetchone()[0] < 1:
                raise ProfileNotFoundError(f"{path} has no profile runs")
            yield conn
    except sqlite3.DatabaseError as e:  # e.g. not an SQLite file
        raise ProfileNotFoundError(f"cannot read {path}: {e}") from e


def latest_run(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT max(run_id) FROM runs").fetchone()
    if row[0] is None:
        raise ProfileNotFoundError("the profile database has no runs yet")
    return int(row[0])


@dataclasses.dataclass
class RunData:
    """One run as read from the database, with every item's timings per path."""

    db_path: str
    run_id: int
    pipeline: str
    mode: str
    started: float
    layout: list[tuple[str, str]]  # (path, kind) in display order
    timings: dict[str, Timings]
    counters: dict[str, dict[str, int]]


def load_run(
    db_path: str | Path, run_id: int | None = None, *, since: float | None = None
) -> RunData:
    """Run ``run_id`` (default: the latest run), with the events that ended at or after
    ``since`` (Unix time; default: all of them) and its latest counters."""
    with open_db(db_path) as conn:
        if run_id is None:
            run_id = latest_run(conn)
        run = conn.execute(
            "SELECT pipeline, mode, started FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        if run is None:
            raise ProfileNotFoundError(f"no run {run_id} in {db_path}")
        layout = conn.execute(
            "SELECT path, kind FROM stages WHERE run_id = ? ORDER BY position", (run_id,)
        ).fetchall()
        timings = compute_timings(layout, _read_events(conn, run_id, since))
        counters = _read_counters(conn, run_id)
    pipeline, mode, started = run
    return RunData(str(db_path), run_id, pipeline, mode, started, layout, timings, counters)


def build_report(
    db_path: str | Path, run_id: int | None = None, *, since: float | None = None
) -> ProfileReport:
    """The report of ``run_id`` (default: the latest run); see load_run."""
    run = load_run(db_path, run_id, since=since)
    stages = [_stage_report(p, kind, run.timings[p], run.counters) for p, kind in run.layout]
    main = run.counters.get(MAIN_PIPELINE_NAME, {})
    # every path's dropped_events count toward MainPipeline's
    dropped = stages[0].dropped_events if stages else 0
    missing = dropped + main.get(EVENTS_LOST, 0)
    restarts = main.get(WRITER_RESTARTS, 0)
    failed = bool(main.get(WRITER_FAILED, 0))
    return ProfileReport(
        run.db_path, run.run_id, run.pipeline, run.mode, run.started, stages,
        complete=not (missing or restarts or failed), missing=missing,
        writer_restarts=restarts, writer_failed=failed,
    )  # fmt: skip


def _read_events(
    conn: sqlite3.Connection, run_id: int, since: float | None
) -> dict[str, npt.NDArray[np.float64]]:
    """{path: array of rows (seq, arrive, start, end)}."""
    query = 'SELECT path, seq, coalesce(arrive, start), start, "end" FROM events WHERE run_id = ?'
    params: tuple[float, ...] = (run_id,)
    if since is not None:
        query += ' AND "end" >= ?'
        params += (since,)
    rows: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    for path, *values in conn.execute(query, params):
        rows[path].append(values)
    return {path: np.array(values, np.float64).reshape(-1, 4) for path, values in rows.items()}


def _read_counters(conn: sqlite3.Connection, run_id: int) -> dict[str, dict[str, int]]:
    if conn.execute("PRAGMA user_version").fetchone()[0] < 2:
        return {}  # schema 1 had no counters
    counters: dict[str, dict[str, int]] = defaultdict(dict)
    for path, name, value in conn.execute(
        "SELECT path, name, value FROM counters WHERE run_id = ?", (run_id,)
    ):
        counters[path][name] = value
    return counters


def compute_timings(
    layout: list[tuple[str, str]], events: dict[str, npt.NDArray[np.float64]]
) -> dict[str, Timings]:
    """Per path (display order, as in the stages table), the timings of its items."""
    empty = np.empty((0, 4))
    sent = events.get(MAIN_PIPELINE_NAME, empty)
    previous_end = (sent[:, 0], sent[:, 2])  # the source's send time is MainPipeline's start
    stages: dict[str, Timings] = {}
    for path, kind in layout:
        if kind != "stage":
            continue
        rows = events.get(path, empty)
        seq, arrive, start, end = rows.T
        before = _lookup(*previous_end, seq)
        wait = start - np.where(np.isnan(before), arrive, before)
        stages[path] = Timings(seq.astype(np.int64), end - start, wait, end - start, end)
        previous_end = (seq, end)
    return {
        path: stages[path] if kind == "stage" else _pipeline_timings(path, events.get(path), stages)
        for path, kind in layout
    }


def _pipeline_timings(path: str, own: _Array | None, stages: dict[str, Timings]) -> Timings:
    """A pipeline's items: its own events, else one span per item over its stages."""
    prefix = path + PATH_SEPARATOR
    inner = [t for p, t in stages.items() if p.startswith(prefix)]
    if not inner:
        nothing = np.empty(0)
        return Timings(nothing.astype(np.int64), nothing, nothing, nothing, nothing)
    seqs = np.concatenate([t.seq for t in inner])
    unique, where = np.unique(seqs, return_inverse=True)
    weights = np.concatenate([t.compute for t in inner])
    compute = np.bincount(where, weights, len(unique)).astype(np.float64)
    if own is not None and len(own):
        seq, start, end = own[:, 0].astype(np.int64), own[:, 2], own[:, 3]
    else:  # a child pipeline: from its first stage's start to its last stage's end
        starts = np.concatenate([t.end - t.compute for t in inner])
        ends = np.concatenate([t.end for t in inner])
        seq, start, end = unique, np.full(len(unique), np.inf), np.full(len(unique), -np.inf)
        np.minimum.at(start, where, starts)
        np.maximum.at(end, where, ends)
    item_compute = _lookup(unique.astype(np.float64), compute, seq.astype(np.float64))
    latency = end - start
    return Timings(seq, latency, latency - item_compute, item_compute, end)


def _lookup(keys: _Array, values: _Array, wanted: _Array) -> _Array:
    """values[i] where keys[i] == wanted[j], for every j; nan where there is none."""
    if not len(keys):
        return np.full(len(wanted), np.nan)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    index = np.minimum(np.searchsorted(sorted_keys, wanted), len(keys) - 1)
    return np.where(sorted_keys[index] == wanted, values[order][index], np.nan)


def _stage_report(
    path: str, kind: str, t: Timings, counters: dict[str, dict[str, int]]
) -> StageReport:
    mine = dict(counters.get(path, {}))
    replicas = _replica_counters(path, counters)
    for values in replicas.values():
        for name, value in values.items():
            mine[name] = mine.get(name, 0) + value
    workers = [counters.get(path, {}), *replicas.values()]  # the counters of its processes
    if path == MAIN_PIPELINE_NAME:  # the whole run's
        every = workers = list(counters.values())
        errors = sum(c.get(name, 0) for c in every for name in _ERROR_COUNTERS)
        dropped = sum(c.get(name, 0) for c in every for name in _DROP_COUNTERS)
        dropped_events = sum(c.get("dropped_events", 0) for c in every)
    else:
        errors = sum(mine.get(name, 0) for name in _ERROR_COUNTERS)
        dropped = sum(mine.get(name, 0) for name in _DROP_COUNTERS)
        dropped_events = mine.get("dropped_events", 0)
    measured = [values for values in workers if RSS in values]
    p50, p95, p99 = _percentiles(t.latency, (50, 95, 99))
    ends = np.sort(t.end)
    span = float(ends[-1] - ends[0]) if len(ends) > 1 else 0.0
    return StageReport(
        path=path,
        kind=kind,
        items=len(t.seq),
        latency_mean=_mean(t.latency),
        latency_p50=p50,
        latency_p95=p95,
        latency_p99=p99,
        queue_wait_mean=_mean(t.wait),
        queue_wait_p95=_percentiles(t.wait, (95,))[0],
        compute_mean=_mean(t.compute),
        compute_p95=_percentiles(t.compute, (95,))[0],
        throughput=(len(ends) - 1) / span if span > 0 else float("nan"),
        dropped=dropped,
        errors=errors,
        dropped_events=dropped_events,
        counters=mine,
        replicas=replicas,
        rss_bytes=sum(values[RSS] for values in measured) if measured else None,
        rss_peak_bytes=max(values.get(RSS_PEAK, 0) for values in measured) if measured else None,
        memory_restarts=sum(values.get(MEMORY_RESTARTS, 0) for values in workers),
    )


def _replica_counters(path: str, counters: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """{replica: counters} recorded under "<path>#<replica>" by a replicated stage."""
    prefix = path + REPLICA_MARK
    return {
        key[len(prefix) :]: values for key, values in counters.items() if key.startswith(prefix)
    }


def _finite(values: _Array) -> _Array:
    return values[np.isfinite(values)]


def _mean(values: _Array) -> float:
    values = _finite(values)
    return float(values.mean()) if len(values) else float("nan")


def _percentiles(values: _Array, qs: tuple[int, ...]) -> list[float]:
    values = _finite(values)
    if not len(values):
        return [float("nan")] * len(qs)
    return [float(v) for v in np.percentile(values, qs)]
