"""An input that ends ends the pipeline cleanly, join() waits for the last output, and
results() yields every output in order, bounded by backpressure. Serial and parallel,
with real worker processes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import stages

from pystream_zmq import Pipeline, StageError

MODES = ["serialize", "parallelize"]


def start(pipeline: Pipeline, mode: str) -> None:
    getattr(pipeline, mode)()


def items(count: int) -> Iterator[dict[str, int]]:
    for x in range(count):
        yield {"x": x}


class Stop:
    """A PyStream-style callable input generator that ends by raising StopIteration."""

    def __init__(self, count: int) -> None:
        self.left = count

    def __call__(self) -> dict[str, int]:
        if not self.left:
            raise StopIteration
        self.left -= 1
        return {"x": 99}


def loud(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("source", ["generator", "list", "callable"])
def test_the_end_of_the_input_stops_the_loop_and_join_waits_for_the_last_output(
    mode: str, source: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    made: Any = {"generator": items(50), "list": list(items(50)), "callable": Stop(50)}[source]
    with Pipeline(input_generator=made) as pipeline:
        pipeline.add(stages.add_one)
        start(pipeline, mode)
        pipeline.start_loop(0)
        assert pipeline.join(timeout=30)
        assert pipeline.input_ended
        stats = pipeline.stats()
        assert (stats.forwarded, stats.delivered) == (50, 50)
        assert pipeline.forward() is False  # nothing more to take
        pipeline.stop_loop()  # no error: the loop ended by itself
    assert loud(caplog) == []
    assert "the input stream ended" in caplog.text


@pytest.mark.parametrize("mode", MODES)
def test_join_says_false_when_the_stream_goes_on_past_its_timeout(mode: str) -> None:
    with Pipeline(input_generator=stages.counting()) as pipeline:
        pipeline.add(stages.add_one)
        start(pipeline, mode)
        pipeline.start_loop(0.001)
        assert pipeline.join(timeout=0.2) is False
        assert not pipeline.input_ended
        pipeline.stop_loop()


@pytest.mark.parametrize("mode", MODES)
def test_join_without_a_loop_waits_for_what_was_forwarded(mode: str) -> None:
    with Pipeline() as pipeline:
        pipeline.add(stages.Sleep(0.01), "Slow")
        start(pipeline, mode)
        for x in range(20):
            assert pipeline.forward({"x": x})
        assert pipeline.join(timeout=30)
        assert pipeline.stats().delivered == 20


@pytest.mark.parametrize("mode", MODES)
def test_results_yields_every_output_in_order_then_ends(mode: str) -> None:
    with Pipeline(input_generator=items(300)) as pipeline:
        pipeline.add(stages.add_one)
        pipeline.add(stages.double)
        start(pipeline, mode)
        outputs = pipeline.results()  # before the loop: every output from now on
        pipeline.start_loop(0)
        assert [out["x"] for out in outputs] == [(x + 1) * 2 for x in range(300)]
        assert pipeline.stats().delivered == 300


def test_results_with_replicas_in_order() -> None:
    with Pipeline(input_generator=items(200)) as pipeline:
        pipeline.add(stages.jitter, "Jitter", replicas=2)
        pipeline.add(stages.add_one)
        pipeline.parallelize()
        outputs = pipeline.results()
        pipeline.start_loop(0)
        seen = list(outputs)
    assert [out["x"] for out in seen] == [x + 1 for x in range(200)]
    assert len({out["pid"] for out in seen}) == 2  # both replicas did work


def test_a_reader_that_falls_behind_holds_the_pipeline_back() -> None:
    """Unread outputs keep their credits: forward() refuses once hwm per link are out and
    unread (memory does not grow), and takes more as the reader reads."""
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one)
        pipeline.parallelize(input_timeout=0.2)
        outputs = pipeline.results()
        accepted = 0
        while pipeline.forward({"x": accepted}):
            accepted += 1
            assert accepted < 100, "nothing holds the pipeline back"
        assert accepted == 4  # hwm=2 per link, two links
        assert [next(outputs)["x"] for _ in range(2)] == [1, 2]
        assert pipeline.forward({"x": 4})
        rest = [next(outputs)["x"] for _ in range(3)]
        assert rest == [3, 4, 5]


def test_results_raise_a_stage_error_under_on_error_raise() -> None:
    with Pipeline(input_generator=items(10), on_error="raise") as pipeline:
        pipeline.add(stages.FailOn(3), "Fail")
        pipeline.parallelize()
        outputs = pipeline.results()
        pipeline.start_loop(0)
        with pytest.raises(StageError, match="item 3"):
            for _ in outputs:
                pass


def test_results_called_after_outputs_came_out_says_what_it_misses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one)
        pipeline.serialize()
        pipeline.forward({"x": 1})
        pipeline.results()
    assert "1 outputs came out before it was called" in caplog.text


def test_results_from_another_thread_while_the_loop_runs_serially() -> None:
    """Serial: forward() (in the loop's thread) waits while the reader is behind."""
    seen: list[int] = []
    with Pipeline(input_generator=items(100)) as pipeline:
        pipeline.add(stages.add_one)
        pipeline.serialize()
        outputs = pipeline.results()
        reader = threading.Thread(target=lambda: seen.extend(o["x"] for o in outputs))
        reader.start()
        pipeline.start_loop(0)
        reader.join(timeout=30)
        assert not reader.is_alive()
    assert seen == [x + 1 for x in range(100)]
