"""Profiling overhead: items/s with ``use_profiler=True`` versus False, in parallel mode, for
small messages (a dict of 3 scalars) at full speed through one stage, and for 1 MB frames
(480x720x3 uint8) through 3 no-op stages. A fresh pipeline per variant and repeat (start-up
not timed), variants alternated, medians and paired ratios from the same run. Target (issue
3): profiled >= 0.95x unprofiled.

On a shared VM whose speed swings, it also reports the CPU time (orchestrator plus workers)
per item, which such swings disturb far less than wall-clock rates.

    .venv/bin/python scripts/bench_profiler.py [--small 20000] [--frames 600] [--repeats 7]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import psutil

from pystream_zmq import Pipeline, set_profiler_db_folder


def no_op(data: Any) -> Any:
    return data


def cpu_seconds() -> float:
    """User + system CPU time of this process and its live workers."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return total


def rate(profiled: bool, items: int, data: dict[str, Any], stages: int) -> tuple[float, float]:
    """(items/s, CPU microseconds per item)."""
    pipeline = Pipeline(use_profiler=profiled)
    for _ in range(stages):
        pipeline.add(no_op)
    pipeline.parallelize()
    try:
        cpu = cpu_seconds()
        started = time.perf_counter()
        for _ in range(items):
            pipeline.forward(data)
        pipeline.stop_loop()  # delivers everything still in flight
        elapsed = time.perf_counter() - started
        return items / elapsed, (cpu_seconds() - cpu) / items * 1e6
    finally:
        pipeline.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=20_000, help="small messages per run")
    parser.add_argument("--frames", type=int, default=600, help="1 MB frames per run")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pystream-bench-") as folder:
        set_profiler_db_folder(folder)  # a scratch database, removed at the end
        measure(args)


def measure(args: argparse.Namespace) -> None:
    small = {"a": 1, "b": 2.5, "c": "three"}
    frame = {"image": np.zeros((480, 720, 3), np.uint8)}
    cases = {
        "small, 1 stage": (args.small, small, 1),
        "1 MB, 3 stages": (args.frames, frame, 3),
    }
    for case, (items, data, stages) in cases.items():
        runs: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        for repeat in range(args.repeats):
            # alternate, and swap which goes first, so drifting load hits both alike
            for profiled in (False, True) if repeat % 2 == 0 else (True, False):
                items_per_s, cpu_per_item = rate(profiled, items, data, stages)
                runs[profiled].append(items_per_s)
                cpu[profiled].append(cpu_per_item)
        for profiled, values in runs.items():
            name = f"{case}, profiler {'on' if profiled else 'off'}"
            runs_text = ", ".join(f"{v:.0f}" for v in values)
            print(f"{name:30} {statistics.median(values):8.0f} items/s  (runs: {runs_text})")
            print(f"{'':30} {statistics.median(cpu[profiled]):8.1f} CPU us/item")
        paired = statistics.median(
            on / off for on, off in zip(runs[True], runs[False], strict=True)
        )
        of_medians = statistics.median(runs[True]) / statistics.median(runs[False])
        print(
            f"{case}: on / off = {paired:.3f}x paired (ratio of medians {of_medians:.3f}x),"
            " target >= 0.95x"
        )
        cpu_ratio = statistics.median(cpu[True]) / statistics.median(cpu[False])
        print(f"{case}: CPU per item on / off = {cpu_ratio:.3f}x (ratio of medians)")


if __name__ == "__main__":
    main()
