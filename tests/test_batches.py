"""Small items travel in batches when they come quickly (transport.KIND_BATCH): forward()
and each worker put several in one ZeroMQ message. Every item still comes out once and in
order, the batches are counted, and an output never waits for a stage call that hangs."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import stages
from conftest import wait_until

from pystream_zmq import Pipeline


def read_in_thread(pipeline: Pipeline) -> tuple[list[Any], threading.Thread]:
    """Every output, read by another thread as a user writes it, until the pipeline ends."""
    outputs: list[Any] = []
    every = pipeline.results()
    reader = threading.Thread(target=lambda: outputs.extend(every), daemon=True)
    reader.start()
    return outputs, reader


def batches(counters: dict[str, dict[str, int]], prefix: str) -> int:
    return sum(c.get("batches", 0) for path, c in counters.items() if path.startswith(prefix))


def test_quick_small_items_go_in_batches_and_come_out_once_in_order() -> None:
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one, "A", replicas=2)
        pipeline.add(stages.add_one, "B")
        pipeline.parallelize()
        outputs, reader = read_in_thread(pipeline)
        sent = 0
        # Batches start once items are seen to come out quickly: a few thousand do here.
        while sent < 60_000:
            for x in range(sent, sent + 5000):
                assert pipeline.forward({"x": x})
            sent += 5000
            stats = pipeline.stats()
            if stats.source["batches"] and batches(stats.stages, "MainPipeline__B"):
                break
        # No forward() after the last one, no drain: the last batch goes by itself.
        assert wait_until(lambda: len(outputs) == sent, timeout=10), (len(outputs), sent)
        pipeline.stop_loop()
        stats = pipeline.stats()
    reader.join(10)
    assert [out["x"] for out in outputs] == [x + 2 for x in range(sent)]
    assert (stats.forwarded, stats.delivered, stats.dropped, stats.lost) == (sent, sent, 0, 0)
    assert 0 < stats.source["batches"] < stats.source["batched"] <= sent
    assert batches(stats.stages, "MainPipeline__A") > 0  # the replicas' outputs, merged in order
    assert batches(stats.stages, "MainPipeline__B") > 0


def test_outputs_done_before_a_stage_call_that_hangs_do_not_wait_for_it(tmp_path: Path) -> None:
    fifo = tmp_path / "gate"
    os.mkfifo(fifo)
    with Pipeline() as pipeline:
        pipeline.add(stages.HoldAt(str(fifo), held=(0, 99)), "Hold")
        pipeline.parallelize(hwm=100)  # all 100 items fit in the queues while 0 is held
        outputs, reader = read_in_thread(pipeline)
        for x in range(100):
            assert pipeline.forward({"x": x})
        with open(fifo, "wb", buffering=0) as gate:
            gate.write(b"1")  # item 0 goes, then 1-98 one after another (in batches)
            # ... and item 99 hangs: the outputs before it come out all the same.
            assert wait_until(lambda: len(outputs) == 99, timeout=10), len(outputs)
            gate.write(b"1")
            pipeline.stop_loop()
        stats = pipeline.stats()
    reader.join(10)
    assert [out["x"] for out in outputs] == list(range(100))
    assert stats.stages["MainPipeline__Hold"]["batches"] > 0


def test_shared_memory_frames_in_batches_arrive_whole_and_in_order() -> None:
    """Arrays in shared memory travel as small descriptors: those batch too, with their
    leases. Every frame's content arrives as it was sent, and a kept one never changes."""
    shape = (480, 720, 3)  # 1 MB, through shared memory
    seen: list[tuple[int, bool]] = []  # (x, whether its image was all x % 251)
    kept: list[Any] = []  # every 50th output, kept to the end

    def read(every: Any) -> None:
        for out in every:
            seen.append((out["x"], bool((out["image"] == out["x"] % 251).all())))
            if out["x"] % 50 == 0:
                kept.append(out)

    with Pipeline() as pipeline:
        for name in "ABC":
            pipeline.add(stages.no_op, name)
        pipeline.parallelize()
        reader = threading.Thread(target=read, args=(pipeline.results(),), daemon=True)
        reader.start()
        sent = 0
        while sent < 20_000:
            for x in range(sent, sent + 1000):
                assert pipeline.forward({"x": x, "image": np.full(shape, x % 251, np.uint8)})
            sent += 1000
            if batches(pipeline.stats().stages, "MainPipeline__C"):
                break
        assert wait_until(lambda: len(seen) == sent, timeout=30), (len(seen), sent)
        pipeline.stop_loop()
        stats = pipeline.stats()
    reader.join(10)
    assert seen == [(x, True) for x in range(sent)]
    assert all((out["image"] == out["x"] % 251).all() for out in kept)
    assert batches(stats.stages, "MainPipeline__C") > 0
    assert stats.stages["MainPipeline__C"]["shm_passed"] > 0
