"""Soak: a parallel pipeline under load for N minutes while a random worker is killed with
SIGKILL every 5-30 s. Prints, per interval and at the end, throughput, p99 latency, RSS and
open-file growth per process, and the loss accounting.

    .venv/bin/python scripts/soak.py --minutes 10 [--replicas 2]

Targets (issue 5), over 10 minutes: 0 losses left unexplained (forwarded = delivered +
dropped + lost, every lost item counted by sequence number), RSS growth < 10 %, open file
count flat.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import time
from typing import Any

import numpy as np
import psutil

from pystream_zmq import Pipeline

FRAME = np.zeros((120, 160, 3), np.uint8)


def touch(data: dict[str, Any]) -> dict[str, Any]:
    data["image"][0, 0, 0] = data["n"] % 256
    return data


def measure(pids: list[int]) -> dict[int, tuple[float, int]]:
    """{pid: (RSS in MB, open file descriptors)}"""
    out = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            out[pid] = (proc.memory_info().rss / 2**20, proc.num_fds())
        except psutil.NoSuchProcess:
            pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=1, help="of the second stage")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    pipeline = Pipeline()
    for i in range(args.stages):
        pipeline.add(touch, f"Stage{i + 1}", replicas=args.replicas if i == 1 else 1)
    # Enough restarts for a kill every 5 s for the whole run.
    pipeline.parallelize(input_timeout=30, max_restarts=int(args.minutes * 12) + 1)
    me = psutil.Process()
    started = time.monotonic()
    end = started + args.minutes * 60
    next_kill = started + rng.uniform(5, 30)
    kills = 0
    baseline: tuple[float, int] | None = None  # the orchestrator's (RSS, fds) after 30 s
    latencies: list[float] = []
    sent = 0
    interval_start, interval_delivered = time.monotonic(), 0
    try:
        while time.monotonic() < end:
            t0 = time.time()
            if pipeline.forward({"n": sent, "t0": t0, "image": FRAME}):
                sent += 1
            out = pipeline.get_results()
            if out is not None:
                latencies.append(time.time() - out["t0"])
            now = time.monotonic()
            if now >= next_kill:
                victim = rng.choice(pipeline.stats().workers)
                os.kill(victim.pid, signal.SIGKILL)
                kills += 1
                next_kill = now + rng.uniform(5, 30)
            if now - interval_start >= 30:
                stats = pipeline.stats()
                delivered = stats.delivered
                rate = (delivered - interval_delivered) / (now - interval_start)
                p99 = statistics.quantiles(latencies, n=100)[98] * 1000 if latencies[100:] else 0
                main_now = measure([me.pid])[me.pid]
                workers = measure([w.pid for w in stats.workers]).values()
                baseline = baseline or main_now
                print(
                    f"t={now - started:5.0f}s {rate:6.0f} items/s  p99 {p99:6.1f} ms"
                    f"  kills {kills}  main RSS {main_now[0]:.1f} MB, {main_now[1]} fds"
                    f"  workers max RSS {max(w[0] for w in workers):.1f} MB,"
                    f" {max(w[1] for w in workers)} fds",
                    flush=True,
                )
                latencies.clear()
                interval_start, interval_delivered = now, delivered
        pipeline.stop_loop()
        book = pipeline.stats()
        final = measure([me.pid])
        print()
        print(
            f"forwarded {book.forwarded}, delivered {book.delivered}, dropped {book.dropped}, "
            f"lost {book.lost} in {len(book.lost_ranges)} ranges, kills {kills}, "
            f"restarts {sum(w.restarts for w in book.workers)}"
        )
        unexplained = book.forwarded - book.delivered - book.dropped - book.lost
        print(f"unexplained losses: {unexplained}")
        if baseline:
            (rss0, fds0), (rss1, fds1) = baseline, final[me.pid]
            print(
                f"orchestrator RSS {rss0:.1f} -> {rss1:.1f} MB ({(rss1 / rss0 - 1) * 100:+.1f} %),"
                f" open files {fds0} -> {fds1}"
            )
    finally:
        pipeline.cleanup()


if __name__ == "__main__":
    main()
