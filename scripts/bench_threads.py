"""Native thread pools per worker (issue 15): items/s serial against parallel, with the
workers' pools limited to a fair share (parallelize's default, ``native_threads="auto"``)
and left alone (``native_threads=None``), on three jobs:

- seed: the seed notebook's five DummyStage stages (100 cv2.filter2D on a 480x720x3 image
  each, services/demo.py); an item is a frame;
- vision: GaussianBlur -> MOG2 background subtraction -> findContours -> rectangles drawn,
  four stages, on synthetic 640x480 frames of a square moving over a noisy background;
- blas: four stages of 20 x (256x256 matrix product, tanh) with numpy: OpenBLAS threads
  wait for work by spinning, the case threadpoolctl is known for.

Serial runs in this process, whose pools are never limited. Every run is a fresh pipeline
(its start-up and one warm-up item not timed); the variants alternate within each repeat,
so that a drifting load hits all alike; items/s are medians, and each ratio is the median
of the ratios paired within a repeat. CPU time per item (every process of the pipeline,
all its threads) shows what idle or spinning pool threads cost, which items/s on a machine
shared with other work can hide.

    .venv/bin/python scripts/bench_threads.py [--jobs seed,vision,blas] [--repeats 5]
        [--seed-items 12] [--vision-items 300] [--blas-items 40]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import psutil

from pystream_zmq import Pipeline
from services.demo import DummyStage

Item = dict[str, Any]
VARIANTS = ("serial", "parallel, limited", "parallel, left alone")
SETTINGS: dict[str, dict[str, Any]] = {
    "serial": {},
    "parallel, limited": {"native_threads": "auto"},
    "parallel, left alone": {"native_threads": None},
}


# -- the seed job ----------------------------------------------------------------------------
def seed_pipeline() -> Pipeline:
    np.random.seed(0)  # the same kernels in every run
    pipeline = Pipeline()
    for i in range(5):
        pipeline.add(DummyStage(f"Stage{i + 1}"))
    return pipeline


def seed_frames(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, size=(480, 720, 3), dtype=np.uint8) for _ in range(count)]


# -- the vision job --------------------------------------------------------------------------
def blur(item: Item) -> Item:
    item["blurred"] = cv2.GaussianBlur(item["frame"], (7, 7), 0)
    return item


def background_subtractor() -> Callable[[Item], Item]:
    """MOG2 keeps a model of the background from frame to frame: made in the process that
    runs it (cv2 objects cannot be pickled), on its first frame."""
    model: list[Any] = []

    def background(item: Item) -> Item:
        if not model:
            model.append(cv2.createBackgroundSubtractorMOG2(history=100, detectShadows=True))
        item["mask"] = model[0].apply(item.pop("blurred"))
        return item

    return background


def contours(item: Item) -> Item:
    _, mask = cv2.threshold(item.pop("mask"), 200, 255, cv2.THRESH_BINARY)  # no shadows
    found, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    item["boxes"] = [cv2.boundingRect(c) for c in found if cv2.contourArea(c) > 100]
    return item


def draw(item: Item) -> Item:
    for x, y, w, h in item["boxes"]:
        cv2.rectangle(item["frame"], (x, y), (x + w, y + h), (0, 255, 0), 2)
    return item


def vision_pipeline() -> Pipeline:
    pipeline = Pipeline()
    pipeline.add(blur, "Blur")
    pipeline.add(background_subtractor(), "Background")
    pipeline.add(contours, "Contours")
    pipeline.add(draw, "Draw")
    return pipeline


def vision_frames(count: int) -> list[np.ndarray]:
    """A 60x60 square crossing a noisy grey scene, 8 pixels a frame."""
    rng = np.random.default_rng(0)
    scene = rng.integers(90, 130, size=(480, 640, 3), dtype=np.uint8)
    frames = []
    for i in range(count):
        frame = scene + rng.integers(0, 6, size=scene.shape, dtype=np.uint8)
        x = 20 + i * 8 % 560
        frame[200:260, x : x + 60] = (30, 200, 240)
        frames.append(frame)
    return frames


# -- the BLAS job ----------------------------------------------------------------------------
def products(item: Item) -> Item:
    a = item["a"]
    for _ in range(20):
        a = np.tanh(a @ a)
    item["a"] = a
    return item


def blas_pipeline() -> Pipeline:
    pipeline = Pipeline()
    for i in range(4):
        pipeline.add(products, f"Products{i + 1}")
    return pipeline


def blas_matrices() -> list[np.ndarray]:
    return [np.random.default_rng(0).standard_normal((256, 256)) / 16]


# -- one run ---------------------------------------------------------------------------------
class Job:
    """A pipeline to build afresh for each run, its items' arrays and the key they go under."""

    def __init__(self, name: str, make: Callable[[], Pipeline], key: str, arrays: list[Any]):
        self.name, self.make, self.key, self.arrays = name, make, key, arrays

    def item(self, index: int) -> Item:
        return {self.key: self.arrays[index % len(self.arrays)].copy()}  # stages draw on it


@dataclass
class Result:
    rate: float  # items/s
    cpu: float  # CPU seconds per item, every process of the pipeline (threads included)
    sizes: list[int | None]  # the workers' native thread pool sizes


def run(job: Job, items: int, variant: str) -> Result:
    """``items`` items through a fresh pipeline."""
    pipeline = job.make()
    if variant == "serial":
        pipeline.serialize()
    else:
        pipeline.parallelize(drain_timeout=600, **SETTINGS[variant])
    try:
        pipeline.forward(job.item(-1))  # warm-up: the first call of each stage
        pipeline.stop_loop()
        workers = pipeline.stats().workers
        procs = [psutil.Process(worker.pid) for worker in workers]
        cpu_before = _cpu_seconds(procs)
        started = time.perf_counter()
        for i in range(items):
            pipeline.forward(job.item(i))
        pipeline.stop_loop()  # delivers everything still in flight
        elapsed = time.perf_counter() - started
        cpu = (_cpu_seconds(procs) - cpu_before) / items
        return Result(items / elapsed, cpu, [worker.native_threads for worker in workers])
    finally:
        pipeline.cleanup()


def _cpu_seconds(workers: list[psutil.Process]) -> float:
    """User and system time of this process and of ``workers``, all their threads."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    times = [proc.cpu_times() for proc in workers]
    return own.ru_utime + own.ru_stime + sum(t.user + t.system for t in times)


def bench(job: Job, items: int, repeats: int) -> None:
    runs: dict[str, list[Result]] = {variant: [] for variant in VARIANTS}
    for _ in range(repeats):
        for variant in VARIANTS:  # alternate, so drifting load hits all alike
            runs[variant].append(run(job, items, variant))
    rate = {v: statistics.median(r.rate for r in results) for v, results in runs.items()}
    cpu = {v: statistics.median(r.cpu for r in results) for v, results in runs.items()}
    print(f"{job.name}: {items} items per run, {repeats} repeats, load average {_load()}")
    for variant, results in runs.items():
        shown = ", ".join(f"{r.rate:.1f}" if r.rate >= 10 else f"{r.rate:.2f}" for r in results)
        pools = "" if variant == "serial" else f"; pools {_pools(results[-1].sizes)}"
        # CPUs busy = CPU s per item x items/s: on 2 idle CPUs a parallel run could use 2.
        busy = statistics.median(r.cpu * r.rate for r in results)
        print(
            f"  {variant:21} {rate[variant]:7.2f} items/s, {cpu[variant] * 1000:6.1f} CPU ms "
            f"per item, {busy:.2f} CPUs busy  (items/s: {shown}{pools})"
        )

    def ratio(a: str, b: str, of: str = "rate") -> str:
        pairs = zip(runs[a], runs[b], strict=True)
        paired = statistics.median(getattr(x, of) / getattr(y, of) for x, y in pairs)
        medians = rate if of == "rate" else cpu
        return f"{paired:.2f}x paired (ratio of medians {medians[a] / medians[b]:.2f}x)"

    print(f"  items/s, parallel limited / serial     = {ratio('parallel, limited', 'serial')}")
    print(f"  items/s, parallel left alone / serial  = {ratio('parallel, left alone', 'serial')}")
    limited = ratio("parallel, limited", "parallel, left alone")
    print(f"  items/s, limited / left alone          = {limited}")
    limited = ratio("parallel, limited", "parallel, left alone", "cpu")
    print(f"  CPU per item, limited / left alone     = {limited}")


def _pools(sizes: list[int | None]) -> str:
    if all(size is None for size in sizes):
        return f"left alone ({len(sizes)} workers)"
    return "x".join(str(size) for size in sizes) + " threads"


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="seed,vision,blas", help="any of seed,vision,blas")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed-items", type=int, default=12)
    parser.add_argument("--vision-items", type=int, default=300)
    parser.add_argument("--blas-items", type=int, default=40)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), load {_load()}")
    jobs = args.jobs.split(",")
    if "seed" in jobs:
        seed = Job("seed (5 x DummyStage)", seed_pipeline, "data", seed_frames(4))
        bench(seed, args.seed_items, args.repeats)
    if "vision" in jobs:
        vision = Job("vision (blur, MOG2, contours, draw)", vision_pipeline, "frame",
                     vision_frames(70))  # fmt: skip
        bench(vision, args.vision_items, args.repeats)
    if "blas" in jobs:
        blas = Job("blas (4 x numpy matrix products)", blas_pipeline, "a", blas_matrices())
        bench(blas, args.blas_items, args.repeats)


if __name__ == "__main__":
    main()
