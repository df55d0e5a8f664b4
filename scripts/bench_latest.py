"""A live source faster than the pipeline: end-to-end latency under each drop policy.

Two stages that take STAGE_A and STAGE_B seconds per frame (sleeping: their work), a
``start_loop`` every PERIOD seconds with a 480x720x3 uint8 frame, for SECONDS each. Latency
is per delivered frame, from ``forward()`` to its output reaching the orchestrator (the
profile's MainPipeline events), shown over the whole run, for the first 10 frames and for
the last second: under "block" it grows as the queues fill (with --small, tiny items that
ZeroMQ and the kernel buffer by the thousand beyond the high-water mark, it keeps growing),
under "latest" it stays near STAGE_A + STAGE_B + one period, and the frames left out are
counted.

    .venv/bin/python scripts/bench_latest.py [--seconds 6] [--period 0.01]
                                             [--stage-a 0.02] [--stage-b 0.03] [--small]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

import pystream_zmq
from pystream_zmq import Pipeline
from pystream_zmq.profiling import report, store


class Work:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, data: dict) -> dict:
        time.sleep(self.seconds)  # the stage's work
        return data


class Camera:
    def __init__(self, small: bool) -> None:
        self.frames = 0
        self.image = np.zeros((1,) if small else (480, 720, 3), np.uint8)

    def __call__(self) -> dict:
        self.frames += 1
        return {"image": self.image, "n": self.frames}


def run(policy: str, args: argparse.Namespace) -> dict:
    camera = Camera(args.small)
    pipeline = Pipeline(input_generator=camera, use_profiler=True)
    pipeline.add(Work(args.stage_a), "A")
    pipeline.add(Work(args.stage_b), "B")
    pipeline.parallelize(drop_policy=policy, drain_timeout=60)
    try:
        started = time.time()
        pipeline.start_loop(args.period)
        time.sleep(args.seconds)  # the run itself
        pipeline.stop_loop()
    finally:
        pipeline.cleanup()
    with report.open_db(store.profiler_db_path()) as conn:
        run_id = report.latest_run(conn)
        rows = conn.execute(
            "SELECT start, end FROM events WHERE run_id = ? AND path = ? ORDER BY start",
            (run_id, pystream_zmq.MAIN_PIPELINE_NAME),
        ).fetchall()
    sent = np.array([r[0] for r in rows]) - started
    latency = np.array([r[1] - r[0] for r in rows]) * 1000
    first, last = latency[:10], latency[sent >= args.seconds - 1.0]
    result = report.build_report(store.profiler_db_path(), run_id)
    counters: dict[str, int] = {}
    for stage in result.stages:
        for name, value in stage.counters.items():
            if name in ("replaced", "expired", "refused"):
                counters[name] = counters.get(name, 0) + value
    main = result.stages[0].counters
    return {
        "policy": policy,
        "frames": camera.frames,
        "forwarded": main.get("forwarded", 0),
        "delivered": main.get("delivered", 0),
        "dropped": main.get("dropped", 0),
        "lost": main.get("lost", 0),
        **counters,
        "p50": float(np.percentile(latency, 50)),
        "p95": float(np.percentile(latency, 95)),
        "max": float(latency.max()),
        "first_p50": float(np.median(first)) if len(first) else float("nan"),
        "last_s_p50": float(np.median(last)) if len(last) else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--period", type=float, default=0.01)
    parser.add_argument("--stage-a", type=float, default=0.02)
    parser.add_argument("--stage-b", type=float, default=0.03)
    parser.add_argument("--small", action="store_true", help="tiny items, not 1 MB frames")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-latest-") as folder:
        pystream_zmq.set_profiler_db_folder(folder)  # a scratch database, removed at the end
        compare_policies(args)


def compare_policies(args: argparse.Namespace) -> None:
    floor = (args.stage_a + args.stage_b) * 1000
    print(
        f"stages {args.stage_a * 1000:g} + {args.stage_b * 1000:g} ms = {floor:g} ms, "
        f"loop period {args.period * 1000:g} ms, {args.seconds:g} s per policy, "
        f"{'tiny items' if args.small else '480x720x3 frames'}; "
        f"latency in ms; target under latest: about {floor + args.period * 1000:g}"
    )
    header = (
        "policy       frames  fwd  deliv  dropped  replaced  refused  lost"
        "    p50    p95    max  first-10 p50  last-s p50"
    )
    print(header)
    for policy in ("block", "latest", "drop-newest"):
        r = run(policy, args)
        print(
            f"{r['policy']:<12} {r['frames']:>6} {r['forwarded']:>4} {r['delivered']:>6}"
            f" {r['dropped']:>8} {r.get('replaced', 0):>9} {r.get('refused', 0):>8}"
            f" {r['lost']:>5} {r['p50']:>6.0f} {r['p95']:>6.0f} {r['max']:>6.0f}"
            f" {r['first_p50']:>13.0f} {r['last_s_p50']:>11.0f}"
        )


if __name__ == "__main__":
    main()
