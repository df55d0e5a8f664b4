"""One node of the dora-rs dataflows that scripts/bench.py measures (see dora_peer.py).

Runs inside .dora-venv (dora-rs, pyarrow, numpy), started by ``dora run``:

    dora_node.py source|hop|sink SPEC.json

The spec (written by dora_peer.py) says what to send: ``payload`` ("mb", "4k" or "small"),
``n`` measured items after one warm-up item, ``mode`` ("throughput" or "latency") and
``window`` (0: no credit window; k: at most k items unacknowledged by the sink). Every item
carries its number in the metadata (``i``; the warm-up is 0, the end marker -1); the sink
counts the items lost and reordered and writes its result to ``spec["result"]``.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from typing import Any

SHAPES = {"mb": (480, 720, 3), "4k": (2160, 3840, 3)}
SMALL = {"a": 1, "b": 2.0, "c": "x"}  # = bench.SMALL
IDLE_S = 5.0  # the sink gives up waiting this long after an event (0.5 s after the end)


def _payload(spec: dict[str, Any]) -> Any:
    import numpy as np
    import pyarrow as pa

    if spec["payload"] == "small":
        return None  # built per message, as a user would
    shape = SHAPES[spec["payload"]]
    frame = (np.arange(int(np.prod(shape))) % 251).astype(np.uint8)
    return pa.array(frame)  # a zero-copy wrap of the numpy buffer


def source(node: Any, spec: dict[str, Any]) -> None:
    import pyarrow as pa

    frame = _payload(spec)
    n, window, latency = spec["n"], spec["window"], spec["mode"] == "latency"
    period = 1.0 / spec.get("rate", 100.0)

    # A small message is the dict as a one-row Arrow struct array of a declared type (type
    # inference would cost ~150 us per message; with the type, ~6 us).
    small_type = pa.struct([("a", pa.int64()), ("b", pa.float64()), ("c", pa.string())])

    def send(i: int, meta: dict[str, Any]) -> None:
        data = pa.array([dict(SMALL)], type=small_type) if frame is None else frame
        node.send_output("data", data, {"i": i, **meta})

    def wait_ack() -> int:
        """What the sink acknowledged (latency: the item's number; credits: the count of
        items it has); -2 when it said it is done, -3 on no answer."""
        event = node.next(timeout=30.0)
        if event is None or event["type"] != "INPUT":
            return -3
        return int(event["value"][0].as_py())

    send(0, {"stamps": [time.time()]} if latency else {})  # warm-up: every link connected
    if wait_ack() != 0:
        raise RuntimeError("no acknowledgement of the warm-up item")
    if latency:
        for i in range(1, n + 1):
            next_at = time.monotonic() + period
            send(i, {"stamps": [time.time()]})
            if wait_ack() != i:
                raise RuntimeError(f"item {i} not acknowledged")
            time.sleep(max(0.0, next_at - time.monotonic()))
    else:
        t0 = time.time()
        acked = 0
        for i in range(1, n + 1):
            while window and i - acked > window:
                got = wait_ack()
                if got < 0:
                    raise RuntimeError("the sink stopped acknowledging")
                acked = max(acked, got)
            send(i, {"t0": t0})
    node.send_output("data", pa.array([0], pa.int64()), {"i": -1})  # the end marker
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and wait_ack() not in (-2, -3):
        pass  # the sink's "done" (or silence): everything it will get is in its hands


def hop(node: Any, spec: dict[str, Any]) -> None:
    latency = spec["mode"] == "latency"
    for event in node:
        if event["type"] == "STOP":
            break
        if event["type"] != "INPUT":
            continue
        meta = event["metadata"]
        if latency and "stamps" in meta:
            meta["stamps"] = [*meta["stamps"], time.time()]
        node.send_output("data", event["value"], meta)


def sink(node: Any, spec: dict[str, Any]) -> None:
    import pyarrow as pa

    n, window, latency = spec["n"], spec["window"], spec["mode"] == "latency"
    ack_every = max(1, window // 4) if window else 0  # credits: items received so far

    def ack(i: int) -> None:
        node.send_output("ack", pa.array([i], pa.int64()))

    seen: set[int] = set()
    reordered = duplicates = 0
    highest = 0
    t0 = t_last = 0.0
    hop_ms: list[float] = []
    total_ms: list[float] = []
    ended = False
    warm = False
    while True:
        event = node.next(timeout=0.5 if ended else IDLE_S if warm else 60.0)
        if event is None or event["type"] in ("STOP", "ERROR"):  # ERROR: the timeout
            break
        if event["type"] != "INPUT":
            continue
        now = time.time()
        meta = event["metadata"]
        i = int(meta["i"])
        if i == -1:
            ended = True  # late (reordered) items may still come: drain until quiet
            if len(seen) == n:
                break
            continue
        if i == 0:
            warm = True
            ack(0)
            continue
        if spec["payload"] == "small":
            event["value"].to_pylist()  # the sink reads the dict, as bench.py's sinks do
        if i in seen:
            duplicates += 1
        elif i < highest:
            reordered += 1
        seen.add(i)
        highest = max(highest, i)
        t_last = now
        if latency:
            stamps = [*meta["stamps"], now]
            hop_ms += [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
            total_ms.append((stamps[-1] - stamps[0]) * 1000)
            ack(i)
        else:
            t0 = t0 or float(meta["t0"])
            if ack_every and len(seen) % ack_every == 0:
                ack(len(seen))
        if ended and len(seen) == n:
            break
    ack(-2)
    got = len(seen)
    result: dict[str, Any] = {"received": got, "lost": n - got, "reordered": reordered}
    result["duplicates"] = duplicates
    result["first_lost"] = sorted(set(range(1, n + 1)) - seen)[:5]
    if latency:
        result |= {"hop_ms": hop_ms, "total_ms": total_ms}
    else:
        result["rate"] = got / (t_last - t0) if got and t_last > t0 else 0.0
    with open(spec["result"], "w") as f:
        json.dump(result, f)


def main() -> None:
    from dora import Node

    role, spec_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    node = Node()
    {"source": source, "hop": hop, "sink": sink}[role](node, spec)


if __name__ == "__main__":
    main()
