"""PyStream's summary of a profiled run: mean latency and throughput per stage path."""

from __future__ import annotations

import itertools
import sqlite3
import statistics
from collections import defaultdict
from contextlib import closing
from pathlib import Path

from pystream_zmq.profiling import schema
from pystream_zmq.stage import PATH_SEPARATOR

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
    with closing(sqlite3.connect(uri, uri=True, timeout=schema.BUSY_TIMEOUT)) as conn:
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
