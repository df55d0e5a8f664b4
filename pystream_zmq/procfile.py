"""``pystream procfile MODULE:ATTR``: write a pipeline defined in Python (a function that
returns a ``Pipeline``) as a Procfile of ``pystream-worker`` processes, so one definition
serves both launch modes.

Layout on ``--base-port`` B: the sink binds B for profile events (when the pipeline is
profiled); from B+1 on, each stage binds its input, then the sink its own: without replicas,
stage i binds B+1+i and the sink B+1+n. A stage with replicas is one entry per replica,
and each receiver binds one input per replica before it. Each process connects its output
to the next ones' inputs (see README "Pipelines as services").
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from typing import Any

import click

from .loader import LoadError, load, reference
from .parallel import Unit, check_order
from .pipeline import Pipeline, PipelineStage

_WORKER = "pystream-worker"


def procfile(
    pipeline: Pipeline,
    *,
    header: str,
    run_name: str,
    period: float,
    base_port: int,
    host: str = "127.0.0.1",
    save_latest: str | None = None,
) -> str:
    """The Procfile text; raises LoadError for what cannot be imported by name."""
    if pipeline.input_generator is None:
        raise LoadError("the pipeline has no input_generator to run as the source")
    entries = pipeline._entries
    for name, stage in entries:
        if isinstance(stage, PipelineStage):
            raise LoadError(
                f"{name} is a sub-pipeline; those cannot be written to a Procfile "
                "yet (run one by hand with `pystream-worker pipeline`)"
            )

    replicas = [pipeline._stage_replicas.get(name, (1, True)) for name, _ in entries]
    check_order(
        [
            Unit(name, [], replicas=n, ordered=o)
            for (name, _), (n, o) in zip(entries, replicas, strict=True)
        ]
    )
    ports = _Ports(host, base_port, [n for n, _ in replicas])

    def push(args: list[str], endpoints: list[str]) -> list[str]:
        return args + [arg for endpoint in endpoints for arg in ("--push", endpoint)]

    def pull(args: list[str], endpoints: list[str], ordered: bool) -> list[str]:
        args = args + [arg for endpoint in endpoints for arg in ("--pull", endpoint)]
        return args if ordered or len(endpoints) == 1 else [*args, "--unordered"]

    profile = ["--profile", ports.profile] if pipeline.use_profiler else []
    ref, params = reference(pipeline.input_generator)
    source = ["source", ref, *_params(params), "--period", f"{period:g}"]
    lines = [("source", push(source, ports.outputs(-1, 0)))]
    for index, (name, stage) in enumerate(entries):
        ref, params = reference(stage)
        args = ["stage", ref, *_params(params)]
        own = getattr(stage, "name", None)
        if name != (own if isinstance(own, str) else ref.rpartition(".")[2].rpartition(":")[2]):
            args += ["--name", name]
        count = replicas[index][0]
        upstream_ordered = index == 0 or replicas[index - 1][1]
        for replica in range(count):
            mine = pull(args, ports.inputs(index, replica), upstream_ordered)
            mine = push(mine, ports.outputs(index, replica)) + profile
            if count > 1:
                mine += ["--replica", str(replica)]
            process = _process_name(name) + (f"_{replica}" if count > 1 else "")
            lines.append((process, mine))
    sink = pull(["sink"], ports.inputs(len(entries), 0), not entries or replicas[-1][1])
    if pipeline.use_profiler:
        stages = ",".join(name for name, _ in entries)
        sink += ["--profile-pull", ports.profile, "--run-name", run_name, "--stages", stages]
    if save_latest:
        sink += ["--save-latest", save_latest]
    lines.append(("sink", sink))
    # exec: the shell honcho starts would otherwise die of SIGTERM before the worker drained
    body = [f"{name}: exec {shlex.join([_WORKER, *args])}" for name, args in lines]
    return "\n".join([f"# {header}", *body]) + "\n"


class _Ports:
    """Ports from ``base``: the profile endpoint, then each input socket in chain order (a
    replica binds one per replica of the stage before it; the sink is last)."""

    def __init__(self, host: str, base: int, replicas: list[int]) -> None:
        self.profile = f"tcp://{host}:{base}"
        senders = [1, *replicas]  # of each receiver: the source, then each stage
        receivers = [*replicas, 1]  # each stage's replicas, then the sink
        self._inputs: list[list[list[str]]] = []  # [receiver][replica][sender]
        port = base + 1
        for count, sending in zip(receivers, senders, strict=True):
            self._inputs.append([])
            for _ in range(count):
                self._inputs[-1].append([f"tcp://{host}:{port + s}" for s in range(sending)])
                port += sending

    def inputs(self, stage: int, replica: int) -> list[str]:
        """What replica ``replica`` of stage ``stage`` (len(stages): the sink) binds."""
        return self._inputs[stage][replica]

    def outputs(self, stage: int, replica: int) -> list[str]:
        """Where replica ``replica`` of stage ``stage`` (-1: the source) connects."""
        return [inputs[replica] for inputs in self._inputs[stage + 1]]


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
@click.option("-o", "--output", type=click.File("w"), default="-", help="Default: stdout.")
def procfile_command(
    ref: str, period: float, base_port: int, save_latest: str | None, output: Any
) -> None:
    """Write the pipeline that MODULE:ATTR returns as a Procfile for honcho."""
    command = ["pystream", "procfile", ref, "--period", f"{period:g}"]
    command += ["--base-port", str(base_port)]
    command += ["--save-latest", save_latest] if save_latest else []
    try:
        define: Callable[[], Any] = load(ref)
        pipeline = define()
        if not isinstance(pipeline, Pipeline):
            raise LoadError(f"it returned a {type(pipeline).__name__}, not a Pipeline")
        text = procfile(
            pipeline,
            header=f"Generated by: {shlex.join(command)}",
            run_name=ref.rpartition(":")[2],
            period=period,
            base_port=base_port,
            save_latest=save_latest,
        )
    except (LoadError, ValueError) as e:
        raise click.ClickException(f"{ref}: {e}") from e
    output.write(text)
