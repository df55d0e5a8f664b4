"""``pystream profile --plot``: latency over time per stage and a latency histogram, as a PNG.
Needs matplotlib (the ``plot`` extra); uses a bare Figure, so no pyplot or global backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pystream_zmq.profiling.report import RunData
from pystream_zmq.stage import MAIN_PIPELINE_NAME, PATH_SEPARATOR


def plot_run(run: RunData, out: str | Path) -> None:
    """Write ``out``: top, each item's latency (ms) against its end time since the run
    started; bottom, a histogram of latencies per path on log-spaced bins."""
    series = []
    for path, _ in run.layout:
        t = run.timings[path]
        ok = np.isfinite(t.latency) & (t.latency > 0)
        if ok.any():
            series.append((_label(path), t.end[ok] - run.started, t.latency[ok] * 1000))
    fig = Figure(figsize=(11, 8), dpi=100, layout="constrained")
    over_time, histogram = fig.subplots(2, 1)
    fig.suptitle(f"Run {run.run_id} of {run.pipeline} ({run.mode}): latency per stage")
    for label, when, latency in series:
        order = np.argsort(when)
        over_time.plot(when[order], latency[order], ".-", ms=3, lw=0.5, label=label)
    over_time.set(xlabel="time since the run started (s)", ylabel="latency (ms)", yscale="log")
    over_time.grid(True, which="both", alpha=0.3)
    if series:
        everything = np.concatenate([latency for _, _, latency in series])
        low, high = everything.min(), everything.max()
        bins = np.geomspace(low, high * 1.001 if high > low else low * 2, 50)
        for label, _, latency in series:
            histogram.hist(latency, bins=bins, histtype="step", lw=1.5, label=label)
        histogram.set_xscale("log")
        over_time.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    else:
        over_time.text(0.5, 0.5, "no items recorded", ha="center", transform=over_time.transAxes)
    histogram.set(xlabel="latency (ms)", ylabel="items")
    histogram.grid(True, which="both", alpha=0.3)
    fig.savefig(out, format="png")


def _label(path: str) -> str:
    prefix = MAIN_PIPELINE_NAME + PATH_SEPARATOR
    return path.removeprefix(prefix) if path != MAIN_PIPELINE_NAME else "MainPipeline (end to end)"
