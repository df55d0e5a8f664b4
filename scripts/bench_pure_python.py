"""Two pure-Python (GIL-bound) stages: items/s in parallel versus serial, measured in the
same run, alternating, medians. Target (issue 2): parallel >= 1.6x serial on 2 cores.

    .venv/bin/python scripts/bench_pure_python.py [--items 200] [--work 40000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from pystream_zmq import Pipeline


def spin(data: dict) -> dict:
    total = 0
    for i in range(data["work"]):
        total += i * i
    data["total"] = total
    return data


def items_per_second(mode: str, items: int, work: int) -> float:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--work", type=int, default=40_000, help="loop length per stage")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runs: dict[str, list[float]] = {"serialize": [], "parallelize": []}
    for _ in range(args.repeats):
        for mode in runs:  # alternate, so drifting machine load hits both alike
            runs[mode].append(items_per_second(mode, args.items, args.work))
    serial, parallel = (statistics.median(runs[m]) for m in ("serialize", "parallelize"))
    for label, mode, median in (
        ("serial", "serialize", serial),
        ("parallel", "parallelize", parallel),
    ):
        runs_text = ", ".join(f"{v:.1f}" for v in runs[mode])
        print(f"{label:8} {median:8.1f} items/s  (runs: {runs_text})")
    print(f"parallel / serial = {parallel / serial:.2f}x (target >= 1.6x)")


if __name__ == "__main__":
    main()
