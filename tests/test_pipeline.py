from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import stages
from conftest import wait_until

from pystream_zmq import (
    MAIN_PIPELINE_NAME,
    Pipeline,
    PipelineStateError,
    Stage,
    StageNameError,
    UnsupportedTypeError,
    WorkerStartupError,
)

MEGABYTE = np.zeros(1 << 20, np.uint8)


# -- names and states ----------------------------------------------------------------------
def test_default_names_count_only_unnamed_stages() -> None:
    pipeline = Pipeline(use_profiler=True)
    pipeline.add(stages.Counter("StageA"))
    pipeline.add(stages.add_one)
    pipeline.add(stages.Counter())  # a Stage without a name attribute
    pipeline.add(stages.add_one, "Custom")
    paths = [path for path, _, _ in pipeline._layout(MAIN_PIPELINE_NAME)]
    names = ["StageA", "Stage_1", "Stage_2", "Custom"]
    assert paths == [f"{MAIN_PIPELINE_NAME}__{name}" for name in names]


@pytest.mark.parametrize("name", ["a-b", "a__b", "_a", "a_", "MainPipeline", "", 3])
def test_invalid_stage_names_are_refused(name: object) -> None:
    with pytest.raises(StageNameError):
        Pipeline().add(stages.add_one, name)  # type: ignore[arg-type]


def test_duplicate_names_are_refused() -> None:
    pipeline = Pipeline()
    pipeline.add(stages.add_one, "Same")
    with pytest.raises(StageNameError, match="already"):
        pipeline.add(stages.double, "Same")


def test_stage_must_be_callable() -> None:
    with pytest.raises(TypeError):
        Pipeline().add(42)  # type: ignore[arg-type]


def test_running_before_mode_is_a_state_error() -> None:
    pipeline = Pipeline(input_generator=lambda: {"x": 1})
    pipeline.add(stages.add_one)
    for call in (pipeline.forward, pipeline.get_results, pipeline.start_loop):
        with pytest.raises(PipelineStateError):
            call()


def test_stage_is_abstract() -> None:
    class Incomplete(Stage):
        def __call__(self, data):  # type: ignore[no-untyped-def]
            return data

    with pytest.raises(TypeError):
        Incomplete()  # type: ignore[abstract]


# -- serial ----------------------------------------------------------------------------------
def test_serial_runs_inline_and_returns_each_output_once() -> None:
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one)
        pipeline.add(stages.double)
        pipeline.add(stages.record_pid)
        pipeline.serialize()
        assert pipeline.forward({"x": 3}) is True
        assert pipeline.get_results() == {"x": 8, "pids": [os.getpid()]}
        assert pipeline.get_results() is None


def test_serial_loop_and_cleanup_reset_state() -> None:
    counter = stages.Counter("Count")
    pipeline = Pipeline(input_generator=lambda: {"x": 0})
    pipeline.add(counter)
    pipeline.serialize()
    pipeline.start_loop(0.001)
    assert wait_until(lambda: counter.count >= 5)
    pipeline.stop_loop()
    assert pipeline.get_results() == {"x": 0}
    pipeline.cleanup()
    assert counter.count == 0
    pipeline.cleanup()  # idempotent
    with pytest.raises(PipelineStateError):
        pipeline.forward({"x": 1})


# -- parallel --------------------------------------------------------------------------------
def test_parallel_runs_each_stage_in_its_own_process_in_order() -> None:
    with Pipeline() as pipeline:
        pipeline.add(stages.record_pid)
        pipeline.add(stages.add_one)
        pipeline.add(stages.record_pid)
        pipeline.parallelize(block_output=True, output_timeout=10)
        workers = {p.pid for p in psutil.Process().children()}
        assert len(workers) == 3
        for x in range(50):
            assert pipeline.forward({"x": x})
            out = pipeline.get_results()
            assert out["x"] == x + 1
            assert set(out["pids"]) <= workers and len(set(out["pids"])) == 2
    assert not psutil.Process().children()


def test_parallel_results_are_the_latest_and_never_repeated() -> None:
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one)
        pipeline.parallelize()
        for x in range(20):
            pipeline.forward({"x": x})
        pipeline.stop_loop()  # no loop to stop, but it delivers what is in flight
        assert pipeline.get_results() == {"x": 20}
        assert pipeline.get_results() is None


def test_arrays_arrive_intact_and_writeable() -> None:
    image = np.random.default_rng(0).integers(0, 255, (480, 720, 3), dtype=np.uint8)
    with Pipeline() as pipeline:
        pipeline.add(stages.draw)
        pipeline.add(stages.draw)
        pipeline.parallelize(block_output=True)
        pipeline.forward({"image": image, "meta": ("cam0", 1.5)})
        out = pipeline.get_results()
    expected = image.copy()
    expected[0, 0] = 255
    assert out["meta"] == ("cam0", 1.5)
    np.testing.assert_array_equal(out["image"], expected)
    assert out["image"].flags.writeable
    assert image[0, 0, 0] != 255 or expected[0, 0, 0] == image[0, 0, 0]  # caller's untouched


@pytest.mark.parametrize(
    "middle",
    [[], [stages.add_to_buffer, stages.keep_buffer]],
    ids=["reused-buffer", "then-passed-on"],
)
def test_arrays_in_flight_keep_every_items_values(middle: list[Any]) -> None:
    """A stage that overwrites the buffer it returned last time must not change an item
    already sent (the worker waits for ZeroMQ to let go); stages that pass on the array
    they received (in place, or as a view) send the frame it came in, without a copy."""
    checker = stages.ChecksBuffer()
    with Pipeline() as pipeline:
        pipeline.add(stages.ReusesItsBuffer())
        for stage in middle:
            pipeline.add(stage)
        pipeline.add(checker)
        pipeline.parallelize()
        for x in range(100):
            assert pipeline.forward({"x": x})
        pipeline.stop_loop()
        assert (checker.checked, checker.corrupt) == (100, 0)


def test_forward_refuses_unsupported_types_with_the_key_path() -> None:
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one)
        pipeline.parallelize()
        with pytest.raises(UnsupportedTypeError, match=r"data\['meta'\]\['box'\]"):
            pipeline.forward({"x": 1, "meta": {"box": object()}})
        with pytest.raises(TypeError):
            pipeline.forward({1, 2})


def test_non_blocking_input_is_refused_when_the_first_stage_is_full(tmp_path: Path) -> None:
    fifo = str(tmp_path / "gate")
    os.mkfifo(fifo)
    with Pipeline() as pipeline:
        pipeline.add(stages.Gate(fifo))
        pipeline.parallelize(block_input=False, hwm=1, block_output=True)
        # 1 MB each, so kernel socket buffers cannot hide the HWM
        accepted = [x for x in range(50) if pipeline.forward({"x": x, "pad": MEGABYTE})]
        assert 1 <= len(accepted) < 50
        with open(fifo, "wb", buffering=0) as gate:
            for x in accepted:  # release one item at a time: they come out in order
                gate.write(b".")
                assert pipeline.get_results()["x"] == x


def test_blocking_input_times_out(tmp_path: Path) -> None:
    fifo = str(tmp_path / "gate")
    os.mkfifo(fifo)
    pipeline = Pipeline()
    pipeline.add(stages.Gate(fifo))
    pipeline.parallelize(block_input=True, input_timeout=0.2, hwm=1)
    results = [pipeline.forward({"x": x, "pad": MEGABYTE}) for x in range(20)]
    assert results[0] is True and results[-1] is False
    with open(fifo, "wb", buffering=0) as gate:
        gate.write(b"." * results.count(True))
        pipeline.cleanup()


def test_a_stage_that_raises_drops_only_that_item() -> None:
    counter = stages.Counter()
    with Pipeline() as pipeline:
        pipeline.add(stages.FailOn(bad=3))
        pipeline.add(counter)
        pipeline.parallelize()
        for x in range(6):
            pipeline.forward({"x": x})
        pipeline.stop_loop()  # deliver what is in flight, bring the count back
        assert counter.count == 5
        assert pipeline.get_results() == {"x": 5}


def test_worker_that_cannot_load_its_stage_fails_parallelize_naming_it() -> None:
    pipeline = Pipeline()
    pipeline.add(stages.add_one)
    pipeline.add(stages.Unloadable(), "Broken")
    started = time.monotonic()
    with pytest.raises(WorkerStartupError, match="Broken") as info:
        pipeline.parallelize(startup_timeout=20)
    assert time.monotonic() - started < 20
    assert "cannot be loaded in a worker" in str(info.value)
    pipeline.cleanup()


def test_stage_that_cannot_be_pickled_is_named() -> None:
    class HoldsALock(Stage):
        def __init__(self) -> None:
            self.lock = threading.Lock()

        def __call__(self, data):  # type: ignore[no-untyped-def]
            return data

        def cleanup(self) -> None:
            pass

    pipeline = Pipeline()
    pipeline.add(HoldsALock(), "Locked")
    with pytest.raises(WorkerStartupError, match="Locked"):
        pipeline.parallelize()


def test_stage_state_comes_back_and_cleanup_runs_in_the_worker() -> None:
    counter = stages.Counter("Count")
    pipeline = Pipeline(input_generator=lambda: {"x": 0})
    pipeline.add(stages.add_one)
    pipeline.add(counter)
    pipeline.parallelize()
    pipeline.start_loop(0.001)
    assert wait_until(lambda: pipeline.get_results() is not None)
    pipeline.stop_loop()
    delivered = pipeline._runner.collector.delivered  # type: ignore[union-attr]
    assert counter.count == delivered > 0
    np.testing.assert_array_equal(counter.kernel, np.arange(4))
    runner_dir = pipeline._runner.launcher.socket_dir  # type: ignore[union-attr]
    started = time.monotonic()
    pipeline.cleanup()
    assert time.monotonic() - started < 5
    assert counter.count == 0
    assert not os.path.exists(runner_dir)
    pipeline.cleanup()


def test_parallelize_twice_is_a_state_error() -> None:
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one)
        pipeline.parallelize()
        with pytest.raises(PipelineStateError):
            pipeline.parallelize()


# -- mixed -----------------------------------------------------------------------------------
def _parent_with_child(child_mode: str) -> tuple[Pipeline, Pipeline]:
    child = Pipeline(use_profiler=True)
    child.add(stages.Counter("StageA"))
    child.add(stages.record_pid, "StageB")
    getattr(child, child_mode)()
    parent = Pipeline(use_profiler=True)
    parent.add(stages.record_pid, "Stage1")
    parent.add(child.as_stage(), "ChildPipeline")
    return parent, child


@pytest.mark.parametrize(("child_mode", "workers"), [("serialize", 2), ("parallelize", 3)])
def test_mixed_pipeline(child_mode: str, workers: int) -> None:
    parent, child = _parent_with_child(child_mode)
    parent.parallelize(block_output=True)
    assert len(psutil.Process().children()) == workers + 1  # and the profile writer
    for x in range(5):
        parent.forward({"x": x})
        out = parent.get_results()
        assert out["x"] == x
        assert len(set(out["pids"])) == 2  # Stage1 and StageB run in different processes
    parent.cleanup()
    latency, throughput = parent.get_profiles()
    assert list(latency) == [
        "MainPipeline",
        "MainPipeline__Stage1",
        "MainPipeline__ChildPipeline",
        "MainPipeline__ChildPipeline__StageA",
        "MainPipeline__ChildPipeline__StageB",
    ]
    assert list(throughput) == list(latency)
    assert all(v > 0 for v in latency.values())
    child_stage = child._entries[0][1]
    assert child_stage.count == 0  # type: ignore[attr-defined]


def test_serial_parent_runs_child_inline() -> None:
    parent, _ = _parent_with_child("serialize")
    with parent:
        parent.serialize()
        parent.forward({"x": 1})
        assert parent.get_results()["pids"] == [os.getpid(), os.getpid()]


# -- profiles --------------------------------------------------------------------------------
def test_profiles_in_parallel_cover_every_stage() -> None:
    pipeline = Pipeline(input_generator=lambda: {"x": 0}, use_profiler=True)
    pipeline.add(stages.Counter("StageA"))
    pipeline.add(stages.add_one)
    pipeline.parallelize()
    for _ in range(30):
        pipeline.forward()
    pipeline.cleanup()
    latency, throughput = pipeline.get_profiles()
    assert list(latency) == ["MainPipeline", "MainPipeline__StageA", "MainPipeline__Stage_1"]
    assert all(0 < v < 5 for v in latency.values())
    assert all(v > 0 for v in throughput.values())
    assert latency["MainPipeline"] > latency["MainPipeline__StageA"]


def test_profiles_off_gives_empty_dicts() -> None:
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one)
        pipeline.serialize()
        pipeline.forward({"x": 1})
    assert pipeline.get_profiles() == ({}, {})
