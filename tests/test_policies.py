"""Real time: drop policies ("latest", "drop-newest") and the frame deadline (max_age).
Every drop is counted, and the ledger still accounts for every item forwarded."""

from __future__ import annotations

import numpy as np
import pytest
import stages
from conftest import wait_until

from pystream_zmq import Pipeline
from pystream_zmq.orchestrator.runner import ParallelRunner

MAIN = "MainPipeline"


def runner(pipeline: Pipeline) -> ParallelRunner:
    assert isinstance(pipeline._runner, ParallelRunner)
    return pipeline._runner


def test_latest_keeps_latency_near_the_stage_times_and_counts_every_drop() -> None:
    stage_time, period = 0.04, 0.005  # a loop 8x faster than the pipeline can go
    with Pipeline(input_generator=stages.tiny, use_profiler=True) as pipeline:
        pipeline.add(stages.Sleep(stage_time), "A")
        pipeline.add(stages.Sleep(stage_time), "B")
        pipeline.parallelize(drop_policy="latest")
        run = runner(pipeline)
        pipeline.start_loop(period)
        assert wait_until(lambda: run.collector.delivered >= 25, timeout=20)
        pipeline.stop_loop()
        book = run.collector.ledger
        assert book.lost == 0
        assert run.forwarded == book.delivered + book.dropped + book.lost
    result = pipeline.get_profile_report()
    assert result is not None
    main, a, b = result.stages
    # Each stage takes the newest item waiting: at most one stage time (B waiting for A's
    # next output) and one period (A waiting for the loop) more than the stages' sum.
    bound = 2 * stage_time + stage_time + period
    assert main.latency_p95 < 2 * bound, (main.latency_p50, main.latency_p95)
    assert main.items == book.delivered
    replaced = main.counters["replaced"] + a.counters["replaced"] + b.counters["replaced"]
    assert main.counters["replaced"] > 0  # the loop outruns the pipeline: newer items win
    assert a.counters["replaced"] + b.counters["replaced"] == book.dropped  # in-flight drops
    assert main.dropped == replaced and a.dropped == a.counters["replaced"]


def test_drop_newest_refuses_at_once_when_the_first_stage_is_full() -> None:
    frame = np.zeros((1024, 1024), np.uint8)  # big enough that kernel buffers fill up
    with Pipeline(use_profiler=True) as pipeline:
        pipeline.add(stages.Sleep(0.02), "Slow")
        pipeline.parallelize(drop_policy="drop-newest", input_timeout=30)
        taken = [pipeline.forward({"x": x, "image": frame}) for x in range(40)]
        pipeline.stop_loop()
        run = runner(pipeline)
        book = run.collector.ledger
        assert taken.count(False) == run.refused > 0
        assert run.forwarded == taken.count(True) == book.delivered
        assert (book.dropped, book.lost) == (0, 0)
    result = pipeline.get_profile_report()
    assert result is not None and result.stages[0].dropped == run.refused


@pytest.mark.parametrize(("max_age", "delivered"), [(0.15, 0), (10.0, 3)])
def test_items_older_than_max_age_are_dropped_where_they_arrive(
    max_age: float, delivered: int
) -> None:
    with Pipeline(use_profiler=True) as pipeline:
        pipeline.add(stages.Sleep(0.3), "Slow")  # every item leaves Slow 0.3 s old
        pipeline.add(stages.add_one, "Next")
        pipeline.parallelize(max_age=max_age)
        for x in range(3):  # items 1 and 2 wait behind item 0 for 0.3 s and more
            assert pipeline.forward({"x": x})
        pipeline.stop_loop()
        book = runner(pipeline).collector.ledger
        assert (book.delivered, book.dropped, book.lost) == (delivered, 3 - delivered, 0)
    result = pipeline.get_profile_report()
    assert result is not None
    main, slow, following = result.stages
    expired = (slow.counters["expired"], following.counters["expired"])
    assert expired == ((2, 1) if delivered == 0 else (0, 0))
    assert slow.counters["processed"] == 1 + delivered // 3 * 2
    assert main.dropped == 3 - delivered


def test_policies_are_checked_before_anything_starts() -> None:
    pipeline = Pipeline()
    with pytest.raises(ValueError, match="drop_policy"):
        pipeline.add(stages.add_one, drop_policy="drop-newest")  # the source's only
    pipeline.add(stages.add_one)
    with pytest.raises(ValueError, match="drop_policy"):
        pipeline.parallelize(drop_policy="oldest")
    with pytest.raises(ValueError, match="max_age"):
        pipeline.parallelize(max_age=0)
    assert pipeline._runner is None


def test_a_stage_can_set_the_policy_of_its_own_input_link() -> None:
    child = Pipeline()
    child.add(stages.add_one, "Inner")
    pipeline = Pipeline()
    pipeline.add(stages.add_one, "First")
    pipeline.add(stages.add_one, "Live", drop_policy="latest")
    pipeline.add(child.as_stage(), "Child", drop_policy="latest")
    units = pipeline.plan().units
    assert [(u.name, u.drop_policy) for u in units] == [
        (f"{MAIN}__First", "block"),
        (f"{MAIN}__Live", "latest"),
        (f"{MAIN}__Child", "latest"),
    ]


def test_a_latest_link_skips_to_the_newest_item_with_markers_in_order() -> None:
    with Pipeline(use_profiler=True) as pipeline:
        pipeline.add(stages.add_one, "First")
        pipeline.add(stages.Sleep(0.05), "Live", drop_policy="latest")
        pipeline.parallelize()
        for x in range(20):  # all sent while Live works on the first
            assert pipeline.forward({"x": x})
        pipeline.stop_loop()
        run = runner(pipeline)
        book = run.collector.ledger
        assert pipeline.get_results() == {"x": 20}  # the newest always goes through
        assert run.forwarded == 20 == book.delivered + book.dropped and book.lost == 0
        assert book.dropped > 0
    result = pipeline.get_profile_report()
    assert result is not None
    main, first, live = result.stages
    assert main.dropped == book.dropped
    assert (live.counters["replaced"], first.counters["replaced"]) == (book.dropped, 0)
    assert live.counters["processed"] == book.delivered
