"""Frames/s and per-hop latency of one pipeline run three ways in the same run: local
processes (ipc, the default), local processes over tcp + CURVE, and Ray actors on a local
cluster of several nodes (tcp + CURVE between distinct loopback addresses); printed with
the ratios to the local run. Needs the ray extra. About a minute on 2 cores.

    python scripts/bench_ray.py [--frames 300] [--stages 3] [--size 480x720x3]

Throughput: ``--frames`` frames through ``--stages`` pass-through stages, as fast as they
go, read with results(). Latency: one frame at a time, round trip / (stages + 1) hops,
median of 100.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pystream_zmq import Pipeline


def passthrough(data: Any) -> Any:
    return data


def build(stages: int) -> Pipeline:
    pipeline = Pipeline()
    for s in range(stages):
        pipeline.add(passthrough, f"Hop{s}", num_cpus=0)  # any node may take any hop
    return pipeline


def measure(
    start: Callable[[Pipeline], object], frames: int, stages: int, shape: tuple[int, ...]
) -> tuple[float, float]:
    """(frames/s, per-hop latency in s) of one way to run the pipeline."""
    frame = {"image": np.zeros(shape, np.uint8)}
    pipeline = build(stages)
    start(pipeline)
    try:
        outputs = pipeline.results()
        for _ in range(20):  # warm-up: connections, first allocations
            pipeline.forward(frame)
            next(outputs)
        began = time.perf_counter()
        sent = received = 0
        while received < frames:  # keep the pipeline full, never past its window
            while sent < frames and sent - received < 8:
                pipeline.forward(frame)
                sent += 1
            next(outputs)
            received += 1
        rate = frames / (time.perf_counter() - began)
        trips = []
        for _ in range(100):
            t = time.perf_counter()
            pipeline.forward(frame)
            next(outputs)
            trips.append(time.perf_counter() - t)
        return rate, statistics.median(trips) / (stages + 1)
    finally:
        pipeline.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--size", default="480x720x3")
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.size.split("x"))

    import ray
    from ray.cluster_utils import Cluster

    ways: dict[str, Callable[[Pipeline], object]] = {
        "local (ipc)": lambda p: p.parallelize(),
        "local (tcp + CURVE)": lambda p: p.parallelize(endpoint="tcp://127.0.0.1", curve=True),
        "Ray actors (tcp + CURVE)": lambda p: p.parallelize(cluster="ray", curve=True),
    }
    small = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={"include_dashboard": False, **small})
    try:
        for address in ("127.0.0.2", "127.0.0.3"):
            cluster.add_node(node_ip_address=address, **small)
        ray.init(address=cluster.address, logging_level="WARNING")
        results = {name: measure(go, args.frames, args.stages, shape) for name, go in ways.items()}
    finally:
        ray.shutdown()
        cluster.shutdown()

    base_rate, base_hop = results["local (ipc)"]
    mb = np.prod(shape) / 2**20
    print(f"{args.frames} frames of {args.size} uint8 ({mb:.2f} MiB), {args.stages} stages")
    print(f"{'':26} {'frames/s':>9} {'ratio':>6} {'per-hop p50':>12} {'ratio':>6}")
    for name, (rate, hop) in results.items():
        print(
            f"{name:26} {rate:9.0f} {rate / base_rate:6.2f} {hop * 1e3:9.2f} ms"
            f" {hop / base_hop:6.2f}"
        )


if __name__ == "__main__":
    main()
