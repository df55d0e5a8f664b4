"""Faults are told, never hang, never orphan: stage errors, worker crashes, accounting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import stages
from conftest import wait_until
from test_seed_notebook import _env, alive

from pystream_zmq import Pipeline, StageError
from pystream_zmq.errors import WorkerCrashedError
from pystream_zmq.stats import PipelineStats


def ledger(pipeline: Pipeline) -> PipelineStats:
    return pipeline.stats()


def worker_pids(pipeline: Pipeline) -> list[int]:
    return [worker.pid for worker in pipeline.stats().workers]


# -- stage errors ------------------------------------------------------------------------
@pytest.mark.parametrize("per_stage", [False, True])
def test_on_error_raise_reports_the_stage_item_and_traceback(per_stage: bool) -> None:
    pipeline = Pipeline() if per_stage else Pipeline(on_error="raise")
    with pipeline:
        if per_stage:
            pipeline.add(stages.FailOn(bad=3), "Picky", on_error="raise")
        else:
            pipeline.add(stages.FailOn(bad=3), "Picky")
        pipeline.add(stages.add_one)
        pipeline.parallelize()
        errors: list[StageError] = []

        def call(method, *args):  # type: ignore[no-untyped-def]
            """The next forward() or get_results() raises, whichever it is."""
            try:
                return method(*args)
            except StageError as e:
                errors.append(e)
                return method(*args)  # it raised before doing anything: again

        for x in range(6):
            call(pipeline.forward, {"x": x})
        pipeline.stop_loop()  # everything came out
        assert call(pipeline.get_results) == {"x": 6}  # the pipeline carries on
        assert len(errors) == 1, errors
        error = errors[0]
        assert (error.stage, error.seq) == ("MainPipeline__Picky", 3)
        assert "cannot take 3" in str(error)
        assert "ValueError: cannot take 3" in error.remote_traceback
        assert (ledger(pipeline).delivered, ledger(pipeline).dropped) == (5, 1)


def test_on_error_raise_in_serial_mode_raises_from_forward() -> None:
    with Pipeline(on_error="raise") as pipeline:
        pipeline.add(stages.FailOn(bad=1))
        pipeline.serialize()
        assert pipeline.forward({"x": 0})
        with pytest.raises(StageError, match="cannot take 1"):
            pipeline.forward({"x": 1})
        assert pipeline.forward({"x": 2})
        assert pipeline.get_results() == {"x": 2}


def test_on_error_must_be_known() -> None:
    with pytest.raises(ValueError, match="on_error"):
        Pipeline(on_error="ignore")


def test_a_dropped_item_is_counted_not_lost() -> None:
    with Pipeline() as pipeline:
        pipeline.add(stages.FailOn(bad=2))
        pipeline.add(stages.add_one)
        pipeline.parallelize()
        for x in range(10):
            pipeline.forward({"x": x})
        pipeline.stop_loop()
        book = ledger(pipeline)
        assert (book.delivered, book.dropped, book.lost) == (9, 1, 0)


# -- worker crashes ----------------------------------------------------------------------
def _forward_in_background(pipeline: Pipeline, items: list) -> threading.Thread:
    sender = threading.Thread(target=lambda: [pipeline.forward(item) for item in items])
    sender.start()
    return sender


@pytest.mark.parametrize(
    ("count", "item"),
    [(3000, {"x": 1}), (300, {"x": 1, "image": np.zeros((480, 720, 3), np.uint8)})],
    ids=["small", "1MB"],
)
def test_kill_9_of_a_middle_worker_is_recovered_and_every_item_accounted(
    count: int, item: dict
) -> None:
    counter = stages.Counter("Last")
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one, "First")
        pipeline.add(stages.add_one, "Middle")
        pipeline.add(counter)
        pipeline.parallelize(input_timeout=30)
        victim = worker_pids(pipeline)[1]
        sender = _forward_in_background(pipeline, [dict(item) for _ in range(count)])
        assert wait_until(lambda: pipeline.stats().delivered > count // 5)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: pipeline.stats().workers[1].restarts == 1, timeout=1.5)
        sender.join(timeout=60)
        assert not sender.is_alive()
        pipeline.stop_loop()
        book = ledger(pipeline)
        forwarded = book.forwarded
        assert forwarded == count
        assert book.delivered + book.dropped + book.lost == forwarded
        assert book.delivered > count // 5 and book.dropped == 0
        assert sum(last - first + 1 for first, last in book.lost_ranges) == book.lost
        assert victim not in worker_pids(pipeline)
        # It recovered: new items flow through the restarted worker.
        pipeline.forward({"x": 41})
        pipeline.stop_loop()
        assert pipeline.get_results()["x"] == 43


def test_the_restarted_worker_of_a_one_stage_pipeline_is_asked_again() -> None:
    """Its READY comes unasked; with no other worker to wait for, it must still be read.
    (The restart is watched from outside: a stats() call under way would read it.)"""
    counter = stages.Counter("Only")
    with Pipeline() as pipeline:
        pipeline.add(counter)
        pipeline.parallelize()
        victim = worker_pids(pipeline)[0]
        os.kill(victim, signal.SIGKILL)
        me = psutil.Process()
        assert wait_until(lambda: [p.pid for p in me.children()] not in ([], [victim]))
        assert pipeline.forward({"x": 1})
        only = "MainPipeline__Only"
        assert wait_until(lambda: pipeline.stats().stages.get(only, {}).get("processed") == 1)
        assert pipeline.stats().workers[0].restarts == 1
        pipeline.stop_loop()
        assert counter.count == 1  # its state came back


def test_past_the_restart_limit_the_pipeline_fails_loudly_naming_the_stage() -> None:
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one, "Fragile")
        pipeline.parallelize(max_restarts=0)
        pipeline.forward({"x": 1})
        os.kill(worker_pids(pipeline)[0], signal.SIGKILL)

        def refuses() -> bool:
            try:
                pipeline.forward({"x": 2})
            except WorkerCrashedError as e:
                return e.stage == "MainPipeline__Fragile"
            return False

        assert wait_until(refuses, timeout=2)
        with pytest.raises(WorkerCrashedError, match="Fragile"):
            pipeline.get_results()


# -- the user's own process ends ---------------------------------------------------------
VICTIM = """
import sys
from pystream_zmq import Pipeline
def same(data): return data
pipeline = Pipeline()
pipeline.add(same)
pipeline.add(same)
pipeline.parallelize()
print(pipeline.stats().socket_dir, flush=True)
sys.stdin.read()
"""


@pytest.mark.parametrize("profiled", [False, True], ids=["plain", "profiled"])
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_the_user_script_ending_leaves_no_worker_and_no_socket_file(
    tmp_path: Path, how: signal.Signals, profiled: bool
) -> None:
    script = tmp_path / "victim.py"
    script.write_text(VICTIM.replace("Pipeline()", f"Pipeline(use_profiler={profiled})"))
    victim = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    try:
        assert victim.stdout is not None
        socket_dir = victim.stdout.readline().strip()
        workers = psutil.Process(victim.pid).children()
        assert len(workers) == 2 + profiled and os.path.isdir(socket_dir)  # + profile writer
        victim.send_signal(how)
        victim.wait(timeout=10)
        assert wait_until(lambda: not any(map(alive, workers)), timeout=10)
        assert wait_until(lambda: not os.path.exists(socket_dir), timeout=5)
    finally:
        victim.kill()
        victim.communicate(timeout=10)
