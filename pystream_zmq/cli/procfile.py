"""``pystream procfile MODULE:ATTR``: write a pipeline defined in Python (a function that
returns a ``Pipeline``) as a Procfile of ``pystream-worker`` processes, so one definition
serves both launch modes.

Layout on ``--base-port`` B: the sink binds B for profile events (when the pipeline is
profiled); from B+1 on, each stage binds its input, then the sink its own: without replicas,
stage i binds B+1+i and the sink B+1+n. A stage with replicas is one entry per replica,
and each receiver binds one input per replica before it. Each process connects its output
to the next ones' inputs (see README "Pipelines as services").

With ``--curve DIR`` every link is under CURVE: each entry gets a key pair of its own in
DIR (mode 0700; secret keys 0600), and every process that binds accepts exactly the keys
of this Procfile's entries (DIR/allowed).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from pystream_zmq.cli import options
from pystream_zmq.cli.loader import (
    LoadError,
    default_name,
    import_from_working_directory,
    load,
    reference,
)
from pystream_zmq.pipeline import Pipeline
from pystream_zmq.plan import Plan
from pystream_zmq.stage import PATH_SEPARATOR
from pystream_zmq.wire import endpoints, security

_WORKER = "pystream-worker"
_ALLOWED = "allowed"  # in the --curve folder: the public keys every binding process accepts
_SOURCE, _SINK = "source", "sink"


def procfile(
    pipeline: Pipeline,
    *,
    header: str,
    run_name: str,
    period: float,
    base_port: int,
    host: str = "127.0.0.1",
    save_latest: str | None = None,
    live_view: tuple[str, int] | None = None,
    curve_dir: str | None = None,
) -> str:
    """The Procfile text; raises LoadError for what cannot be imported by name.
    ``live_view``: (host, port) where the sink serves its live view.
    ``curve_dir``: every entry gets CURVE options naming the key files there (which
    ``write_curve_keys`` makes)."""
    if pipeline.input_generator is None:
        raise LoadError("the pipeline has no input_generator to run as the source")
    planned = pipeline.plan()
    _refuse_sub_pipelines(planned)
    profile_endpoint = f"tcp://{host}:{base_port}"
    link_endpoint = {
        name: f"tcp://{host}:{base_port + 1 + i}" for i, name in enumerate(planned.link_names())
    }

    def links(option: str, names: Sequence[str]) -> list[str]:
        return [arg for name in names for arg in (option, link_endpoint[name])]

    def inputs(names: Sequence[str], ordered: bool) -> list[str]:
        # --ordered is the default, and a single input has nothing to merge
        return links("--pull", names) + ([] if ordered or len(names) == 1 else ["--unordered"])

    profile = ["--profile", profile_endpoint] if pipeline.use_profiler else []
    ref, params = reference(pipeline.input_generator)
    source = ["source", ref, *_params(params), "--period", f"{period:g}"]
    lines = [(_SOURCE, source + links("--push", planned.source_connects))]
    for process in planned.processes:
        unit = planned.units[process.unit]
        name, stage = _stage_name(unit.name), unit.leaves[0][1]
        ref, params = reference(stage)
        args = ["stage", ref, *_params(params)]
        if name != default_name(stage, ref):
            args += ["--name", name]
        args += inputs(process.binds, process.ordered_input)
        args += links("--push", process.connects) + profile
        if unit.replicas > 1:
            args += ["--replica", str(process.replica)]
        lines.append((_entry_name(planned, process.index), args))
    sink = [_SINK, *inputs(planned.sink_binds, planned.sink_ordered)]
    if pipeline.use_profiler:
        stages = ",".join(_stage_name(unit.name) for unit in planned.units)
        sink += ["--profile-pull", profile_endpoint, "--run-name", run_name, "--stages", stages]
    if save_latest:
        sink += ["--save-latest", save_latest]
    if live_view is not None:
        address = endpoints.address(*live_view)
        if not security.is_loopback_host(live_view[0]):
            raise ValueError(
                f"--live-view {address}: not a loopback address; the view has no "
                "authentication (run the sink with --insecure by hand if you must)"
            )
        sink += ["--live-view", address]
    lines.append((_SINK, sink))
    if curve_dir is not None:
        lines = _with_curve(lines, planned, os.path.abspath(curve_dir), pipeline.use_profiler)
    # exec: the shell honcho starts would otherwise die of SIGTERM before the worker drained
    body = [f"{name}: exec {shlex.join([_WORKER, *args])}" for name, args in lines]
    return "\n".join([f"# {header}", *body]) + "\n"


def entry_names(pipeline: Pipeline) -> list[str]:
    """The Procfile's entries, in order: source, one per stage process, sink."""
    planned = pipeline.plan()
    return [_SOURCE, *(_entry_name(planned, p.index) for p in planned.processes), _SINK]


def write_curve_keys(directory: str, entries: Sequence[str]) -> None:
    """A key pair per entry in ``directory`` (kept when there already), and in its
    ``allowed`` folder the public keys of exactly these entries."""
    folder = Path(directory)
    missing = [e for e in entries if not (folder / f"{e}{security.SECRET_SUFFIX}").exists()]
    security.generate(folder, missing, force=True)  # force: a public key without its secret
    allowed = folder / _ALLOWED
    allowed.mkdir(mode=0o700, exist_ok=True)
    for stale in allowed.glob(f"*{security.PUBLIC_SUFFIX}"):
        stale.unlink()
    for entry in entries:
        public = (folder / f"{entry}{security.PUBLIC_SUFFIX}").read_text()
        security.write_key_file(allowed / f"{entry}{security.PUBLIC_SUFFIX}", public, 0o644)


def _with_curve(
    lines: list[tuple[str, list[str]]], planned: Plan, folder: str, profiled: bool
) -> list[tuple[str, list[str]]]:
    """Each entry's arguments with its CURVE options: its own key pair; where it binds,
    the allowed keys; where it connects, the key of the entry bound there (per --push)."""
    binder = {name: _SINK for name in planned.sink_binds}
    for process in planned.processes:
        binder.update(dict.fromkeys(process.binds, _entry_name(planned, process.index)))
    pushes = {_SOURCE: list(planned.source_connects), _SINK: []}
    pushes.update({_entry_name(planned, p.index): list(p.connects) for p in planned.processes})

    def key(entry: str, suffix: str = security.PUBLIC_SUFFIX) -> str:
        return os.path.join(folder, f"{entry}{suffix}")

    out = []
    for entry, args in lines:
        extra = ["--curve-secret", key(entry, security.SECRET_SUFFIX)]
        if entry != _SOURCE:  # every other entry binds its inputs
            extra += ["--curve-allow", os.path.join(folder, _ALLOWED)]
        for link in pushes[entry]:
            extra += ["--curve-server-key", key(binder[link])]
        if profiled and entry not in (_SOURCE, _SINK):
            extra += ["--curve-profile-key", key(_SINK)]
        out.append((entry, args + extra))
    return out


def _entry_name(planned: Plan, index: int) -> str:
    process = planned.processes[index]
    unit = planned.units[process.unit]
    entry = _process_name(_stage_name(unit.name))
    return f"{entry}_{process.replica}" if unit.replicas > 1 else entry


def _refuse_sub_pipelines(planned: Plan) -> None:
    """Each unit must be one stage at the top level (``pystream-worker stage``): one leaf,
    the unit itself, right below MainPipeline."""
    for unit in planned.units:
        if len(unit.leaves) != 1 or unit.leaves[0][0] != unit.name or _depth(unit.name) > 1:
            raise LoadError(
                f"{_stage_name(unit.name)} is a sub-pipeline; those cannot be written to a "
                "Procfile yet (run one by hand with `pystream-worker pipeline`)"
            )


def _stage_name(path: str) -> str:
    """The stage's name: its path below MainPipeline."""
    return path.partition(PATH_SEPARATOR)[2]


def _depth(path: str) -> int:
    return path.count(PATH_SEPARATOR)


def _params(params: dict[str, Any]) -> list[str]:
    args = []
    for key, value in params.items():
        text = value if isinstance(value, str) and not _is_json(value) else json.dumps(value)
        args += ["--param", f"{key}={text}"]
    return args


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _process_name(stage_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", stage_name)


@click.command("procfile")
@click.argument("ref", metavar="MODULE:ATTR")
@click.option(
    "--period",
    type=click.FloatRange(min=0),
    default=0.01,
    show_default=True,
    help="Seconds between two items from the source.",
)
@click.option(
    "--base-port",
    type=click.IntRange(1, 65000),
    default=5700,
    show_default=True,
    help="First of the tcp ports the processes bind.",
)
@click.option("--save-latest", metavar="FILE", help="Have the sink write the latest image here.")
@click.option(
    "--live-view",
    type=options.HOST_PORT,
    metavar="HOST:PORT",
    help="Have the sink serve the outputs' images and per-stage figures to a browser at "
    "http://HOST:PORT/ (loopback only: the view has no authentication).",
)
@click.option(
    "--run-name",
    metavar="NAME",
    help="What the sink calls its profile runs (pystream profile --list)  [default: ATTR]",
)
@click.option(
    "--curve",
    "curve_dir",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Put every link under CURVE: a key pair per entry in DIR (made mode 0700; keys "
    "already there are kept), each process accepting only this Procfile's keys.",
)
@click.option("-o", "--output", type=click.File("w"), default="-", help="Default: stdout.")
def procfile_command(
    ref: str,
    period: float,
    base_port: int,
    save_latest: str | None,
    live_view: tuple[str, int] | None,
    run_name: str | None,
    curve_dir: str | None,
    output: Any,
) -> None:
    """Write the pipeline that MODULE:ATTR returns as a Procfile for honcho."""
    command = ["pystream", "procfile", ref, "--period", f"{period:g}"]
    command += ["--base-port", str(base_port)]
    command += ["--save-latest", save_latest] if save_latest else []
    command += ["--live-view", endpoints.address(*live_view)] if live_view else []
    command += ["--run-name", run_name] if run_name else []
    command += ["--curve", curve_dir] if curve_dir else []
    import_from_working_directory()
    try:
        define: Callable[[], Any] = load(ref)
        pipeline = define()
        if not isinstance(pipeline, Pipeline):
            raise LoadError(f"it returned a {type(pipeline).__name__}, not a Pipeline")
        text = procfile(
            pipeline,
            header=f"Generated by: {shlex.join(command)}",
            run_name=run_name or ref.rpartition(":")[2],
            period=period,
            base_port=base_port,
            save_latest=save_latest,
            live_view=live_view,
            curve_dir=curve_dir,
        )
        if curve_dir is not None:  # once the Procfile can be written: it names these keys
            write_curve_keys(curve_dir, entry_names(pipeline))
    except (LoadError, ValueError) as e:  # SecurityError is a ValueError
        raise click.ClickException(f"{ref}: {e}") from e
    output.write(text)
