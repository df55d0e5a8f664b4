"""What serialize()'s check of the data between stages costs (issue 14): the seed's serial
run and small dicts through no-op stages, with ``check_sendable`` on and off, alternated in
the same run, medians; and one check against one encode of the same item.

- seed: the demo notebook's serial part, 5 DummyStage of 100 cv2.filter2D calls each on a
  480x720x3 uint8 image, profiled as there; items forwarded back to back (the notebook
  paces them every 0.2 s, which would only measure the period).
- small: ``{"seq", "t", "name", "box", "ok"}`` through 5 stages that return their input.

    .venv/bin/python scripts/bench_serial_check.py [--repeats 7] [--seed-items 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit
from typing import Any

import numpy as np

from pystream_zmq import Pipeline
from pystream_zmq.wire import codec
from services.demo import DummyStage

SMALL = {"seq": 12, "t": 1.5, "name": "camera-1", "box": [1, 2, 3, 4], "ok": True}


def noop(data: Any) -> Any:
    return data


def seconds_per_item(workload: str, check: bool, items: int) -> float:
    if workload == "seed":
        pipeline = Pipeline(use_profiler=True)
        for i in range(5):
            pipeline.add(DummyStage(f"Stage{i + 1}"))
    else:
        pipeline = Pipeline()
        for _ in range(5):
            pipeline.add(noop)
    pipeline.serialize(check_sendable=check)
    try:
        if workload == "seed":
            made = [
                {"data": np.random.randint(0, 255, size=(480, 720, 3), dtype=np.uint8)}
                for _ in range(items)
            ]
            started = time.perf_counter()
            for item in made:
                pipeline.forward(item)
        else:
            started = time.perf_counter()
            for _ in range(items):
                pipeline.forward(SMALL)
        elapsed = time.perf_counter() - started
        assert pipeline.get_results() is not None
        return elapsed / items
    finally:
        pipeline.cleanup()


def per_call(fn: Any, obj: object) -> float:
    number = 20_000
    return min(timeit.repeat(lambda: fn(obj), number=number, repeat=7)) / number


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed-items", type=int, default=10)
    parser.add_argument("--small-items", type=int, default=50_000)
    args = parser.parse_args()

    image = np.zeros((480, 720, 3), np.uint8)
    print("one call, best of 7 (us):   encode    check")
    for name, obj in [
        ("small dict", SMALL),
        ("dict with a 480x720x3 image", {"data": image}),
        ("the same, image non-contiguous", {"data": image[:, ::2]}),
    ]:
        encode_us, check_us = (per_call(f, obj) * 1e6 for f in (codec.encode, codec.check))
        print(f"  {name:32} {encode_us:8.2f} {check_us:8.2f}")

    for workload, items in (("seed", args.seed_items), ("small", args.small_items)):
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for check in (False, True):  # alternated: the machine's drift hits both alike
                times[check].append(seconds_per_item(workload, check, items))
        off, on = (statistics.median(times[c]) for c in (False, True))
        ratios = statistics.median(a / b for a, b in zip(times[True], times[False], strict=True))
        unit, scale = ("ms", 1e3) if workload == "seed" else ("us", 1e6)
        print(
            f"{workload}: per item, median of {args.repeats}: check off {off * scale:.3f} {unit}, "
            f"on {on * scale:.3f} {unit}, +{(on - off) * 1e6:.1f} us "
            f"(paired ratio on/off {ratios:.3f})"
        )


if __name__ == "__main__":
    main()
