"""Two pure-Python (GIL-bound) stages: items/s in parallel versus serial, measured in the
same run, alternating, medians. Target (issue 2): parallel >= 1.6x serial on 2 cores.
And one such stage with replicas=2 versus replicas=1 (issue 6): target >= 1.8x.

As a yardstick for the machine itself, it also times the same work split over two bare
processes with no pipeline at all (``multiprocessing``): on a shared 2-core VM that ratio is
itself well below 2x.

    .venv/bin/python scripts/bench_pure_python.py [--items 100] [--work 100000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

from pystream_zmq import Pipeline


def spin(data: dict) -> dict:
    total = 0
    for i in range(data["work"]):
        total += i * i
    data["total"] = total
    return data


def pipeline_rate(mode: str, items: int, work: int) -> float:
    pipeline = Pipeline()
    pipeline.add(spin, "SpinA")
    pipeline.add(spin, "SpinB")
    getattr(pipeline, mode)()
    try:
        started = time.perf_counter()
        for _ in range(items):
            pipeline.forward({"work": work})
        pipeline.stop_loop()  # delivers everything still in flight
        return items / (time.perf_counter() - started)
    finally:
        pipeline.cleanup()


def replicas_rate(replicas: int, items: int, work: int) -> float:
    """One stage, ``replicas`` worker processes, outputs in input order."""
    pipeline = Pipeline()
    pipeline.add(spin, "Spin", replicas=replicas)
    pipeline.parallelize()
    try:
        started = time.perf_counter()
        for _ in range(items):
            pipeline.forward({"work": work})
        pipeline.stop_loop()
        return items / (time.perf_counter() - started)
    finally:
        pipeline.cleanup()


def _spin_many(items: int, work: int) -> None:
    for _ in range(items):
        spin({"work": work})


def bare_processes_rate(items: int, work: int) -> float:
    """Each of two processes does one stage's share of the work: the machine's ceiling."""
    procs = [multiprocessing.Process(target=_spin_many, args=(items, work)) for _ in range(2)]
    started = time.perf_counter()
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    return items / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--work", type=int, default=100_000, help="loop length per stage")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    variants = {
        "serial": lambda: pipeline_rate("serialize", args.items, args.work),
        "parallel": lambda: pipeline_rate("parallelize", args.items, args.work),
        "bare 2 processes": lambda: bare_processes_rate(args.items, args.work),
        "1 stage, 1 replica": lambda: replicas_rate(1, args.items, args.work),
        "1 stage, 2 replicas": lambda: replicas_rate(2, args.items, args.work),
    }
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():  # alternate, so drifting load hits all alike
            runs[name].append(run())
    median = {name: statistics.median(values) for name, values in runs.items()}
    for name, values in runs.items():
        runs_text = ", ".join(f"{v:.1f}" for v in values)
        print(f"{name:19} {median[name]:7.1f} items/s  (runs: {runs_text})")

    # The machine's speed drifts between repeats, so the headline ratio pairs the variants
    # of the same repeat (median of per-repeat ratios); the ratio of medians is shown too.
    def ratio(a: str, b: str) -> str:
        paired = statistics.median(x / y for x, y in zip(runs[a], runs[b], strict=True))
        return f"{paired:.2f}x paired (ratio of medians {median[a] / median[b]:.2f}x)"

    print(f"parallel / serial         = {ratio('parallel', 'serial')}, target >= 1.6x")
    print(f"bare 2 processes / serial = {ratio('bare 2 processes', 'serial')}, the machine's own")
    print(f"parallel / bare           = {ratio('parallel', 'bare 2 processes')}")
    replicas = ratio("1 stage, 2 replicas", "1 stage, 1 replica")
    print(f"2 replicas / 1 replica    = {replicas}, target >= 1.8x")


if __name__ == "__main__":
    main()
