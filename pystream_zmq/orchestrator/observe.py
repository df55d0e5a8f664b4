"""``Pipeline.stats()`` of a parallel pipeline, put together from what each part of the
orchestrator knows: the launcher (processes, links), the supervisor (restarts), the
collector's ledger and counters, and the workers' own counters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pystream_zmq.orchestrator.launcher import BaseLauncher
from pystream_zmq.orchestrator.supervisor import Supervisor
from pystream_zmq.profiling.store import RSS, RSS_PEAK
from pystream_zmq.stats import PipelineStats, WorkerStats


def worker_stats(
    launcher: BaseLauncher[Any], supervisor: Supervisor, stages: Mapping[str, Any], *, closed: bool
) -> tuple[WorkerStats, ...]:
    """Each worker process: pid, whether it runs, restarts and why, memory, thread pools."""
    return tuple(
        WorkerStats(
            name,
            proc.pid,
            not closed and index in launcher.ready and proc.poll() is None,
            supervisor.restarts[index],
            dict(supervisor.restart_reasons[index]),
            stages.get(name, {}).get(RSS),
            stages.get(name, {}).get(RSS_PEAK),
            launcher.native_threads,
            *launcher.node_of(index),
        )
        for index, (name, proc) in enumerate(zip(launcher.names, launcher.procs, strict=True))
    )


def pipeline_stats(
    counters: Mapping[str, int],
    workers: tuple[WorkerStats, ...],
    stages: dict[str, dict[str, int]],
    launcher: BaseLauncher[Any],
    *,
    lost_ranges: tuple[tuple[int, int], ...],
    out: int,
    max_in_flight: int,
    source: dict[str, int],
) -> PipelineStats:
    """``counters``: the orchestrator's (``ParallelRunner.main_counters()``)."""
    curve = launcher.links.curve
    return PipelineStats(
        mode="parallel",
        forwarded=counters["forwarded"],
        refused=counters["refused"],
        replaced=counters["replaced"],
        delivered=counters["delivered"],
        dropped=counters["dropped"],
        lost=counters["lost"],
        rogue=counters["rogue"],
        rogue_control=counters["rogue_control"],
        lost_ranges=lost_ranges,
        out=out,
        max_in_flight=max_in_flight,
        decode_errors=counters["decode_errors"],
        workers=workers,
        stages=stages,
        endpoints=launcher.links.bound(),
        socket_dir=launcher.socket_dir,
        curve_public_key=curve.public if curve is not None else None,
        source=source,
        shared_memory=bool(launcher.shm_fds),
    )
