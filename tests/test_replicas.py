"""Replicas: several worker processes share one stage's input; outputs in input order."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import stages
from conftest import wait_until

from pystream_zmq import Pipeline


def runner(pipeline: Pipeline):  # type: ignore[no-untyped-def]
    return pipeline._runner


def forward_all(pipeline: Pipeline, items: list[dict]) -> None:
    for item in items:
        assert pipeline.forward(item)


def test_two_replicas_share_the_work_and_the_next_stage_sees_input_order() -> None:
    recorder = stages.Recorder()
    with Pipeline() as pipeline:
        pipeline.add(stages.jitter, "Jitter", replicas=2)
        pipeline.add(recorder)
        pipeline.parallelize()
        forward_all(pipeline, [{"x": x} for x in range(300)])
        pipeline.stop_loop()  # drains, then brings the recorder's state back
        assert recorder.seen == list(range(300))
        assert len(set(recorder.pids)) == 2  # both replicas worked
        book = runner(pipeline).collector.ledger
        assert (book.delivered, book.dropped, book.lost) == (300, 0, 0)


def test_a_burst_of_small_items_is_shared_evenly_between_busy_replicas() -> None:
    # forward() sends 100 small items in a few ms; a replica's queue that is full for that
    # moment (its I/O thread has not run yet) once let the other replica take 98 of them.
    for _ in range(4):
        recorder = stages.Recorder()
        with Pipeline() as pipeline:
            pipeline.add(stages.spin_and_note_pid, "Spin", replicas=2)
            pipeline.add(recorder)
            pipeline.parallelize()
            forward_all(pipeline, [{"x": x, "work": 50_000} for x in range(100)])
            pipeline.stop_loop()
        assert recorder.seen == list(range(100))
        shares = sorted(recorder.pids.count(pid) for pid in set(recorder.pids))
        assert len(shares) == 2 and shares[0] >= 35, shares


def test_replicas_of_the_last_stage_are_merged_in_order_at_the_output() -> None:
    with Pipeline(use_profiler=True) as pipeline:
        pipeline.add(stages.add_one, "First")
        pipeline.add(stages.jitter, "Jitter", replicas=3)
        pipeline.parallelize()
        forward_all(pipeline, [{"x": x} for x in range(200)])
        pipeline.stop_loop()
        # The output ledger counts an item that comes out of order as not delivered.
        book = runner(pipeline).collector.ledger
        assert (book.delivered, book.lost) == (200, 0)
        assert pipeline.get_results()["x"] == 200  # the last one is the newest
    report = pipeline.get_profile_report()
    assert report is not None
    jitter = next(s for s in report.stages if s.path == "MainPipeline__Jitter")
    assert jitter.items == 200  # one stage in the profiles, all replicas' events
    assert jitter.counters["processed"] == 200  # summed over the replicas
    assert sorted(jitter.replicas) == ["0", "1", "2"]
    assert sum(c["processed"] for c in jitter.replicas.values()) == 200
    assert all(c["processed"] > 0 for c in jitter.replicas.values())


def test_unordered_replicas_deliver_every_item_once() -> None:
    recorder = stages.Recorder()
    with Pipeline() as pipeline:
        pipeline.add(stages.jitter, "Jitter", replicas=2, ordered=False)
        pipeline.add(recorder)
        pipeline.parallelize()
        forward_all(pipeline, [{"x": x} for x in range(300)])
        pipeline.stop_loop()
        assert sorted(recorder.seen) == list(range(300))
        book = runner(pipeline).collector.ledger
        assert (book.delivered, book.lost) == (300, 0)


def test_a_killed_replica_neither_blocks_the_order_nor_goes_uncounted() -> None:
    recorder = stages.Recorder()
    count = 3000
    with Pipeline() as pipeline:
        pipeline.add(stages.jitter, "Jitter", replicas=2)
        pipeline.add(recorder)
        pipeline.parallelize(input_timeout=30)
        victim = runner(pipeline).launcher.procs[0].pid
        sender = threading.Thread(
            target=forward_all, args=(pipeline, [{"x": x} for x in range(count)]), daemon=True
        )
        sender.start()
        assert wait_until(lambda: runner(pipeline).collector.delivered > 100)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: runner(pipeline).supervisor.restarts[0] == 1, timeout=1.5)
        sender.join(timeout=60)
        assert not sender.is_alive()
        pipeline.stop_loop()
        book = runner(pipeline).collector.ledger
        assert book.delivered + book.dropped + book.lost == count
        assert book.delivered > 100
        # Whatever came through came in order, each once; the missing ones are counted lost.
        assert recorder.seen == sorted(set(recorder.seen))
        assert len(recorder.seen) == book.delivered
        pipeline.forward({"x": count})  # it recovered
        pipeline.stop_loop()
        assert recorder.seen[-1] == count


def test_a_serial_sub_pipeline_can_be_replicated() -> None:
    child = Pipeline()
    child.add(stages.add_one, "A")
    child.add(stages.jitter, "B")
    child.serialize()
    recorder = stages.Recorder()
    with Pipeline() as pipeline:
        pipeline.add(child.as_stage(), "Child", replicas=2)
        pipeline.add(recorder)
        pipeline.parallelize()
        forward_all(pipeline, [{"x": x} for x in range(100)])
        pipeline.stop_loop()
        assert recorder.seen == list(range(1, 101))
        assert len(set(recorder.pids)) == 2


def test_layouts_that_cannot_keep_order_are_refused() -> None:
    with Pipeline() as pipeline:
        with pytest.raises(ValueError, match="replicas must be"):
            pipeline.add(stages.add_one, replicas=0)
        pipeline.add(stages.add_one, "A", replicas=2)
        pipeline.add(stages.add_one, "B", replicas=2)
        with pytest.raises(ValueError, match="set ordered=False on MainPipeline__A"):
            pipeline.parallelize()
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one, "A", replicas=2, ordered=False)
        pipeline.add(stages.add_one, "B")
        pipeline.add(stages.add_one, "C", replicas=2)
        with pytest.raises(ValueError, match="already out of order"):
            pipeline.parallelize()
    with Pipeline() as pipeline:  # replicas mean nothing inline: serial mode runs it once
        pipeline.add(stages.add_one, "A", replicas=2)
        pipeline.add(stages.add_one, "B", replicas=2)
        pipeline.serialize()
        pipeline.forward({"x": 0})
        assert pipeline.get_results() == {"x": 2}
