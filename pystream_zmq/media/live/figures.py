"""Where the live view's table comes from: a figures source is a callable that returns one
row per stage path, a dict with ``stage``, ``items_per_s``, ``p95_ms``, ``dropped`` and
``errors`` (None where a figure is unknown). Three are made here:

- ``profile_figures(db_path, run_id)``: from a profile database as it grows (what
  ``pystream top`` shows): rates and p95 latency over the last ``window`` seconds, drops
  and errors of the whole run;
- ``pipeline_figures(pipeline)``: a profiled pipeline's database as above, else its
  ``stats()`` (rates from its counters; no latency);
- ``counter_figures(counters)``: a dict of counters such as a sink's (``delivered``).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pystream_zmq.profiling import report
from pystream_zmq.stage import MAIN_PIPELINE_NAME, PATH_SEPARATOR

if TYPE_CHECKING:
    from pystream_zmq.pipeline import Pipeline
    from pystream_zmq.stats import PipelineStats

Row = dict[str, Any]
Figures = Callable[[], list[Row]]

WINDOW = 5.0  # seconds that rates and percentiles cover, as in `pystream top`
# The counter names the profile report sums into drops and errors (profiling/report.py).
_DROPS = ("refused", "replaced", "expired")
_ERRORS = ("stage_errors", "decode_errors", "encode_errors")


class Rates:
    """Items/s per name from successive counts: the change over the last ``window`` seconds
    (over what there is, early on); None until a name has two counts."""

    def __init__(self, window: float = WINDOW) -> None:
        self._window = window
        self._counts: dict[str, collections.deque[tuple[float, int]]] = {}

    def __call__(self, name: str, count: int, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        counts = self._counts.setdefault(name, collections.deque())
        counts.append((now, count))
        # Keep one count at least `window` old, as the start of the span measured.
        while len(counts) > 2 and now - counts[1][0] >= self._window:
            counts.popleft()
        then, before = counts[0]
        return (count - before) / (now - then) if now > then else None


def row(
    path: str,
    items_per_s: float | None,
    p95_ms: float | None = None,
    dropped: int = 0,
    errors: int = 0,
) -> Row:
    """One stage's row; the path is shown below MainPipeline without its prefix."""
    prefix = MAIN_PIPELINE_NAME + PATH_SEPARATOR
    return {
        "stage": path[len(prefix) :] if path.startswith(prefix) else path,
        "items_per_s": _known(items_per_s),
        "p95_ms": _known(p95_ms),
        "dropped": dropped,
        "errors": errors,
    }


def profile_figures(db_path: str | Path, run_id: int, window: float = WINDOW) -> Figures:
    """Rows of run ``run_id`` of a profile database, read afresh at each call."""

    def rows() -> list[Row]:
        profile = report.build_report(db_path, run_id, since=time.time() - window)
        # The throughput of the window's items, between their first and last end: records
        # reach the database in batches, so counting items over the window would lag.
        return [
            row(s.path, s.throughput, s.latency_p95 * 1000, s.dropped, s.errors)
            for s in profile.stages
        ]

    return rows


def pipeline_figures(pipeline: Pipeline, window: float = WINDOW) -> Figures:
    """Rows of a running pipeline: from its profile database when it is profiled
    (``Pipeline.profile_run``), else from ``stats()``."""
    rates = Rates(window)

    def rows() -> list[Row]:
        run = pipeline.profile_run
        if run is not None:
            return profile_figures(run.db_path, run.run_id, window)()
        return stats_rows(pipeline.stats(), rates)

    return rows


def stats_rows(stats: PipelineStats, rates: Rates) -> list[Row]:
    """MainPipeline (its outputs), then each worker's path that reports items processed."""
    stages = stats.stages
    dropped = stats.refused + stats.replaced
    dropped += sum(c.get(name, 0) for c in stages.values() for name in ("replaced", "expired"))
    errors = stats.decode_errors + sum(c.get(name, 0) for c in stages.values() for name in _ERRORS)
    rows = [row(MAIN_PIPELINE_NAME, rates(MAIN_PIPELINE_NAME, stats.delivered), None, dropped,
                errors)]  # fmt: skip
    for path, counters in stages.items():
        processed = counters.get("processed")
        rows.append(
            row(
                path,
                None if processed is None else rates(path, processed),
                None,
                sum(counters.get(name, 0) for name in _DROPS),
                sum(counters.get(name, 0) for name in _ERRORS),
            )
        )
    return rows


def counter_figures(counters: Callable[[], Mapping[str, int]], window: float = WINDOW) -> Figures:
    """One MainPipeline row from counters with ``delivered`` (and ``dropped``,
    ``decode_errors`` if there): a sink's, which has no profile database."""
    rates = Rates(window)

    def rows() -> list[Row]:
        now = counters()
        delivered = rates(MAIN_PIPELINE_NAME, now.get("delivered", 0))
        return [row(MAIN_PIPELINE_NAME, delivered, None, now.get("dropped", 0),
                    now.get("decode_errors", 0))]  # fmt: skip

    return rows


def _known(value: float | None) -> float | None:
    """JSON has no nan: an unknown figure is None."""
    return None if value is None or math.isnan(value) else round(value, 3)
