"""parallelize(pin_cpus=True): a CPU per worker process, one for the orchestrator's helper
threads, round-robin over the CPUs this process may use; the caller's threads stay free."""

from __future__ import annotations

import os

import psutil
import pytest
import stages

from pystream_zmq import Pipeline, cpus


def test_the_plan_goes_round_robin_over_the_allowed_cpus(caplog: pytest.LogCaptureFixture) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    ours, workers = cpus.plan(2 * len(allowed) + 1)
    assert ours == allowed[0]
    assert workers[: len(allowed)] == allowed[1:] + allowed[:1]
    assert set(workers) == set(allowed)
    assert "cannot move off a busy CPU" in caplog.text  # more processes than CPUs: told


def test_each_worker_runs_on_its_cpu_and_the_caller_stays_free() -> None:
    caller_cpus = os.sched_getaffinity(0)
    ours, planned = cpus.plan(3)
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one, "One")
        pipeline.add(stages.add_one, "Two", replicas=2)
        pipeline.parallelize(pin_cpus=True)
        assert pipeline.forward({"x": 1})
        pipeline.stop_loop()
        assert pipeline.get_results() == {"x": 3}
        workers = sorted(psutil.Process().children(), key=lambda proc: proc.pid)
        # The workers' main threads (their pid): started in chain order, one per replica.
        assert [os.sched_getaffinity(proc.pid) for proc in workers] == [{c} for c in planned]
        collector = pipeline._runner.collector  # type: ignore[union-attr]
        assert os.sched_getaffinity(collector.native_id) == {ours}
        assert os.sched_getaffinity(0) == caller_cpus  # this thread: not pinned
