"""``pystream profile`` (a run's report as a table, JSON, CSV or plot) and ``pystream top`` (a
live view). Both only read the SQLite database, so they work for any process that writes it."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import click

from pystream_zmq.profiling import report, runs
from pystream_zmq.profiling.report import ProfileNotFoundError, ProfileReport, StageReport
from pystream_zmq.profiling.store import DB_FILENAME, get_profiler_db_folder
from pystream_zmq.stage import MAIN_PIPELINE_NAME, PATH_SEPARATOR

PLOT_HINT = "--plot needs matplotlib: pip install 'pystream-zmq[plot]'"
_CSV_FIELDS = [f.name for f in dataclasses.fields(StageReport) if f.name != "counters"]
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen
_WIDTH = 100  # columns every table fits in

_db_argument = click.argument("db", required=False, type=click.Path(dir_okay=False, path_type=Path))
_run_option = click.option(
    "--run", "run_id", type=int, help="Run id (default: the latest run in the database)."
)


def _default_db(db: Path | None) -> Path:
    # Not profiler_db_path(): reading must not create the folder.
    return db if db is not None else Path(get_profiler_db_folder()) / DB_FILENAME


@click.command()
@_db_argument
@_run_option
@click.option(
    "--list", "list_runs", is_flag=True,
    help="List the runs instead: name, start, duration and items (with --json: as JSON).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--csv", "as_csv", is_flag=True, help="Print one CSV row per stage.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw latency over time and a latency histogram into this PNG file.",
)
def profile(
    db: Path | None,
    run_id: int | None,
    list_runs: bool,
    as_json: bool,
    as_csv: bool,
    plot: Path | None,
) -> None:
    """Print the profile report of a run: per stage, items, latency (mean, p50, p95, p99),
    queue wait versus compute, throughput, drops, errors and the peak resident memory of its
    worker. DB defaults to the profile database of get_profiler_db_folder()."""
    if as_json and as_csv:
        raise click.UsageError("--json and --csv cannot be combined")
    db = _default_db(db)
    if list_runs:
        if run_id is not None or as_csv or plot is not None:
            raise click.UsageError("--list takes no --run, --csv or --plot")
        _print_runs(db, as_json)
        return
    try:
        if plot is not None:
            _plot(db, run_id, plot)
        result = report.build_report(db, run_id)
    except ProfileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))  # with complete and missing
    elif as_csv:
        if (warning := result.warning()) is not None:
            click.echo(warning, err=True)  # stdout stays one CSV table
        writer = csv.DictWriter(sys.stdout, _CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(stage.to_dict() for stage in result.stages)
    else:
        click.echo(_header(result))
        click.echo(format_table(result.stages))
    if plot is not None:
        click.echo(f"plot written to {plot}", err=True)


def _print_runs(db: Path, as_json: bool) -> None:
    try:
        found = runs.list_runs(db)
    except ProfileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps([run.to_dict() for run in found], indent=2))
    else:
        click.echo(format_runs(found))


def format_runs(found: Sequence[runs.RunSummary]) -> str:
    """Runs as an aligned table that fits 100 columns (a long name is cut short)."""
    head = ["run", "name", "mode", "started", "duration", "items"]
    rows = [
        [str(run.run_id), run.name, run.mode, _time(run.started), _duration(run.duration),
         str(run.items)]
        for run in found
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    room = _WIDTH - (sum(widths) - widths[1]) - 2 * (len(head) - 1)
    widths[1] = min(widths[1], room)
    for row in rows:
        if len(row[1]) > room:
            row[1] = row[1][: room - 3] + "..."
    lines = [
        "  ".join(cell.rjust(w) if i in (0, 4, 5) else cell.ljust(w)
                  for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
        for row in [head, *rows]
    ]  # fmt: skip
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def _time(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _plot(db: Path, run_id: int | None, out: Path) -> None:
    try:
        from pystream_zmq.profiling.plot import plot_run
    except ImportError:
        raise click.ClickException(PLOT_HINT) from None
    plot_run(report.load_run(db, run_id), out)


@click.command()
@_db_argument
@_run_option
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
    help="Seconds between refreshes.",
)  # fmt: skip
@click.option(
    "--window", type=click.FloatRange(min=0.5), default=5.0, show_default=True,
    help="Rates and percentiles cover the last this many seconds.",
)  # fmt: skip
@click.option("--once", is_flag=True, help="Print one frame and exit.")
def top(db: Path | None, run_id: int | None, interval: float, window: float, once: bool) -> None:
    """A live view of a run (default: the latest, re-checked at each refresh): per stage
    items/s, p95 latency, queue wait and compute over the last WINDOW seconds, the run's
    drops and errors so far, and its worker's resident memory now and at its highest.
    Ctrl-C exits."""
    db = _default_db(db)
    clear = not once and sys.stdout.isatty()
    try:
        while True:
            now = time.time()
            try:
                frame = report.build_report(db, run_id, since=now - window)
            except ProfileNotFoundError as e:
                raise click.ClickException(str(e)) from None
            header = _header(frame, f", last {window:g} s")
            text = header + "\n" + format_table(frame.stages, window)
            click.echo((_CLEAR if clear else "") + text)
            if once:
                return
            time.sleep(interval)  # a display refresh, not synchronisation
    except KeyboardInterrupt:
        return


def _header(result: ProfileReport, suffix: str = "") -> str:
    """The run's line, and under it the warning when records are missing."""
    started = _time(result.started)
    header = (
        f"run {result.run_id} of {result.pipeline} ({result.mode}), started {started}, "
        f"{result.db_path}{suffix}"
    )
    warning = result.warning()
    return header if warning is None else f"{header}\n{warning}"


def format_table(stages: Sequence[StageReport], window: float | None = None) -> str:
    """Stages as an aligned text table that fits 100 columns; times in ms, stage paths below
    MainPipeline without its prefix. Without ``window`` (profile), the workers' resident
    memory follows in a table of its own (there is no room beside the times). With
    ``window`` (top): items/s is the number of items in the window divided by its length,
    and the memory is in the same table."""
    if window is None:
        head = ["stage", "items", "mean", "p50", "p95", "p99", "wait", "wait95", "comp",
                "comp95", "items/s", "drop", "err"]  # fmt: skip
    else:
        head = ["stage", "items/s", "p95", "wait", "wait95", "comp", "drop", "err", "rss",
                "peak", "replaced"]  # fmt: skip
    rows = []
    for s in stages:
        name = _short(s.path)
        if window is None:
            rows.append([name, str(s.items), *_ms(s.latency_mean, s.latency_p50,
                         s.latency_p95, s.latency_p99, s.queue_wait_mean, s.queue_wait_p95,
                         s.compute_mean, s.compute_p95), _num(s.throughput, 1),
                         str(s.dropped), str(s.errors)])  # fmt: skip
        else:
            rows.append([name, _num(s.items / window, 1), *_ms(s.latency_p95,
                         s.queue_wait_mean, s.queue_wait_p95, s.compute_mean), str(s.dropped),
                         str(s.errors), *_memory(s)])  # fmt: skip
    title = "times in ms (wait: queue wait, comp: compute)"
    if window is not None:
        return f"{title}\n{_MEMORY_TITLE}\n{_aligned(head, rows)}"
    text = f"{title}\n{_aligned(head, rows)}"
    measured = [s for s in stages if s.rss_bytes is not None]
    if measured:
        memory = [[_short(s.path), *_memory(s)] for s in measured]
        text += f"\n\n{_MEMORY_TITLE}\n{_aligned(['stage', 'rss', 'peak', 'replaced'], memory)}"
    return text


_MEMORY_TITLE = (
    "resident MB (rss: as last reported, peak: a worker's highest; replaced: past max_memory_mb)"
)


def _memory(stage: StageReport) -> list[str]:
    """rss and peak in MB, and memory restarts: the memory columns."""
    return [_mb(stage.rss_bytes), _mb(stage.rss_peak_bytes), str(stage.memory_restarts)]


def _aligned(head: list[str], rows: list[list[str]]) -> str:
    """A header, a rule and the rows: the first column left-aligned, the others right."""
    rows = [head, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                  for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _short(path: str) -> str:
    """A stage path without the common MainPipeline__ prefix (MainPipeline itself stays)."""
    prefix = MAIN_PIPELINE_NAME + PATH_SEPARATOR
    return path[len(prefix) :] if path.startswith(prefix) else path


def _ms(*seconds: float) -> list[str]:
    """Milliseconds with three significant figures or so: 0.123, 1.23, 12.3, 123."""
    out = []
    for value in (s * 1000 for s in seconds):
        digits = (
            0 if math.isnan(value) or value >= 100 else 1 if value >= 10 else 2 if value >= 1 else 3
        )
        out.append(_num(value, digits))
    return out


def _mb(value: int | None) -> str:
    """Bytes in MiB, whole; "-" when unknown."""
    return "-" if value is None else f"{value / 2**20:.0f}"


def _num(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"
