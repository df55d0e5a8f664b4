"""Small messages through one no-op stage: items/s, and CPU time per item in every thread
of the orchestrator and the worker (from /proc, Linux only), medians over fresh pipelines.

Wall-clock rates swing by +-30 % on a shared VM; CPU time per item swings less and says
where the time goes (the orchestrator's main thread runs forward(), its second Python
thread is the collector, ZMQbg/IO are ZeroMQ's I/O threads).

    .venv/bin/python scripts/bench_small.py [--items 40000] [--repeats 7] [--hwm 2] [--reader]

``--reader``: another thread reads every output with ``results()`` as they come (how a user
writes it), and the run ends when it has read them all; without it, ``stop_loop()`` ends it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from pystream_zmq import Pipeline

ITEM = {"a": 1, "b": 2.0, "c": "x"}


def noop(data: Any) -> Any:
    return data


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of ``pid``, keyed by a name that stays the same between
    pipelines: process role, thread name and its rank among threads of that name."""
    ticks = os.sysconf("SC_CLK_TCK")
    seen: dict[str, int] = defaultdict(int)
    out = {}
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        try:
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        seen[name] += 1
        out[f"{name}#{seen[name]}"] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def child_pids() -> list[int]:
    pids = []
    for tid in os.listdir("/proc/self/task"):
        pids += [int(pid) for pid in Path(f"/proc/self/task/{tid}/children").read_text().split()]
    return pids


def one_run(items: int, hwm: int, reader: bool) -> tuple[float, dict[str, float]]:
    pipeline = Pipeline()
    pipeline.add(noop, "Noop")
    pipeline.parallelize(block_output=True, output_timeout=30, hwm=hwm)
    try:
        pipeline.forward(dict(ITEM))
        pipeline.stop_loop()  # warm-up: every link is connected
        (worker_pid,) = child_pids()  # profiling is off: the worker is the only child
        roles = {"orchestrator": os.getpid(), "worker": worker_pid}
        before = {role: thread_cpu(pid) for role, pid in roles.items()}
        batch = [dict(ITEM) for _ in range(items)]
        read = threading.Thread(target=read_all, args=(pipeline, items), daemon=True)
        started = time.perf_counter()
        if reader:
            read.start()
        for item in batch:
            pipeline.forward(item)
        if reader:
            read.join(60)
            if read.is_alive():
                raise RuntimeError("the reader did not get every output in 60 s")
        else:
            pipeline.stop_loop()
        elapsed = time.perf_counter() - started
        per_item = {}
        for role, pid in roles.items():
            for thread, seconds in thread_cpu(pid).items():
                used = seconds - before[role].get(thread, 0.0)
                per_item[f"{role} {thread}"] = used / items * 1e6
        return items / elapsed, per_item
    finally:
        pipeline.cleanup()


def read_all(pipeline: Pipeline, items: int) -> None:
    for count, _ in enumerate(pipeline.results(), 1):
        if count == items:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=40_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hwm", type=int, default=2)
    parser.add_argument("--reader", action="store_true", help="read outputs in another thread")
    args = parser.parse_args()
    rates, cpu = [], defaultdict(list)
    for _ in range(args.repeats):
        rate, per_item = one_run(args.items, args.hwm, args.reader)
        rates.append(rate)
        for thread, micros in per_item.items():
            cpu[thread].append(micros)
    runs = ", ".join(f"{r:.0f}" for r in rates)
    print(f"items/s median {statistics.median(rates):.0f}  (runs: {runs})")
    print("CPU per item, median over runs (threads using under 0.5 us left out):")
    total = 0.0
    for thread, values in sorted(cpu.items()):
        median = statistics.median(values)
        total += median
        if median >= 0.5:
            print(f"  {thread:32} {median:6.1f} us")
    print(f"  {'all threads':32} {total:6.1f} us")


if __name__ == "__main__":
    main()
