"""The data path under pressure: items in flight are bounded whatever their size, and what
cannot travel is refused where it is made, under its own name. Real processes and sockets."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pytest
import stages

from pystream_zmq import ItemTooLargeError, Pipeline, Stage, UnsupportedTypeError
from pystream_zmq.wire import codec

_OVER_THE_CAP = codec.DEFAULT_MAX_MESSAGE_BYTES + 2**20  # np.zeros: pages never touched


def accepted_before_refusal(pipeline: Pipeline, items: int) -> tuple[int, float]:
    """Forward small items until one is refused: how many went in, and how long the refused
    forward() waited."""
    for x in range(items):
        started = time.monotonic()
        if not pipeline.forward({"x": x}):
            return x, time.monotonic() - started
    return items, 0.0


@pytest.mark.parametrize(("hwm", "max_in_flight", "bound"), [(2, 1000, 4), (2, 1, 1), (3, 1000, 6)])
def test_small_items_in_flight_are_bounded_under_block(
    hwm: int, max_in_flight: int, bound: int
) -> None:
    """One stage of 0.3 s per item, forward() waiting 0.2 s: only the items with a credit
    enter (hwm per link, two links), the next forward() waits its timeout and says False,
    and the drain is as short as the work let in."""
    with Pipeline() as pipeline:
        pipeline.add(stages.Sleep(0.3), "Slow")
        pipeline.parallelize(
            block_input=True, input_timeout=0.2, hwm=hwm, max_in_flight=max_in_flight
        )
        assert pipeline.stats().max_in_flight == max_in_flight
        accepted, waited = accepted_before_refusal(pipeline, 30)
        assert accepted == bound
        assert 0.15 < waited < 2.0
        started = time.monotonic()
        pipeline.stop_loop()
        assert time.monotonic() - started < 0.3 * bound + 2.0
        stats = pipeline.stats()
        assert (stats.forwarded, stats.delivered, stats.refused) == (bound, bound, 1)


def test_drop_newest_refuses_at_once_when_no_credit_is_free() -> None:
    with Pipeline() as pipeline:
        pipeline.add(stages.Sleep(0.3), "Slow")
        pipeline.parallelize(drop_policy="drop-newest", hwm=2)
        accepted, waited = accepted_before_refusal(pipeline, 30)
        assert 1 <= accepted <= 4  # fewer when ZeroMQ has not yet moved the first ones on
        assert waited < 0.15
        pipeline.stop_loop()
        assert pipeline.stats().delivered == accepted


def test_credits_come_back_as_items_come_out() -> None:
    """A bound of 2 does not stop 200 items from going through, in order."""
    recorder = stages.Recorder()
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one)
        pipeline.add(recorder, "Recorder")
        pipeline.parallelize(max_in_flight=2, input_timeout=10)
        for x in range(200):
            assert pipeline.forward({"x": x})
            assert pipeline.stats().forwarded - pipeline.stats().out <= 2
        pipeline.stop_loop()
        assert recorder.seen == [x + 1 for x in range(200)]


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ({"image": np.zeros(_OVER_THE_CAP, np.uint8)}, "message limit"),
        ({"keys": dict.fromkeys(map(str, range(codec.DEFAULT_MAX_CONTAINER_LEN + 1)))}, "items"),
    ],
    ids=["600MB-array", "dict-of-1000001-keys"],
)
def test_forward_refuses_what_no_worker_would_take(item: dict[str, Any], reason: str) -> None:
    """Raised by forward(), naming the key path; nothing counted as sent, nothing lost, and
    the pipeline goes on."""
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one)
        pipeline.parallelize(block_output=True)
        with pytest.raises(ItemTooLargeError, match=reason) as refused:
            pipeline.forward(item)
        assert "data" in str(refused.value)
        assert pipeline.forward({"x": 1})
        assert pipeline.get_results() == {"x": 2}
        pipeline.stop_loop()
        stats = pipeline.stats()
        assert (stats.forwarded, stats.delivered, stats.lost) == (1, 1, 0)


def test_the_limit_is_settable() -> None:
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one)
        pipeline.parallelize(max_message_bytes=1000)
        with pytest.raises(ItemTooLargeError, match="1000-byte"):
            pipeline.forward({"x": 1, "pad": b"." * 1000})
        assert pipeline.forward({"x": 1, "pad": b"." * 10})


class Inflate(Stage):
    """Returns an array over the message cap for item 1 (np.zeros: its pages are never
    touched), the item itself otherwise."""

    def __init__(self) -> None:
        self.name = "Inflate"

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        if data["x"] == 1:
            return {"x": 1, "big": np.zeros(_OVER_THE_CAP, np.uint8)}
        return data

    def cleanup(self) -> None:
        pass


def test_a_stage_output_over_the_cap_is_that_stages_error_not_a_loss(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    with Pipeline() as pipeline:
        pipeline.add(Inflate())
        pipeline.add(stages.add_one)
        pipeline.parallelize()
        for x in range(3):
            assert pipeline.forward({"x": x})
        pipeline.stop_loop()
        stats = pipeline.stats()
        assert (stats.delivered, stats.dropped, stats.lost) == (2, 1, 0)
        assert stats.stages["MainPipeline__Inflate"]["encode_errors"] == 1
    (record,) = [r for r in caplog.records if "cannot be sent" in r.getMessage()]
    assert record.name == "pystream_zmq.stages.MainPipeline.Inflate"
    assert "Inflate returned what cannot be sent (item 1 dropped)" in record.getMessage()
    assert "message limit" in record.getMessage()
    assert record.seq == 1  # type: ignore[attr-defined]
    assert "lost with a worker" not in caplog.text


def test_quick_small_items_get_a_wider_window_up_to_the_cap() -> None:
    """Through a no-op stage, the window opens past hwm per link (small items would run at
    half their rate otherwise), and never past max_in_flight."""
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one)
        pipeline.parallelize(max_in_flight=50)
        widest = 0
        for x in range(20000):
            assert pipeline.forward({"x": x})
            if x % 100 == 0:
                stats = pipeline.stats()
                widest = max(widest, stats.forwarded - stats.out)
        pipeline.stop_loop()
        assert pipeline.stats().delivered == 20000
    assert 4 < widest <= 50


def surrogate(data: dict[str, Any]) -> dict[str, Any]:
    """Returns text os.fsdecode would make of an undecodable file name, for item 1."""
    if data["x"] == 1:
        return {"name": b"caf\xe9".decode("utf-8", "surrogateescape")}
    return data


def test_text_that_is_not_valid_utf8_is_refused_not_a_crash() -> None:
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    with pytest.raises(UnsupportedTypeError, match="not valid UTF-8"):
        codec.encode({"name": name})
    with Pipeline() as pipeline:
        pipeline.add(surrogate)
        pipeline.parallelize()
        with pytest.raises(UnsupportedTypeError, match="not valid UTF-8"):
            pipeline.forward({"name": name})
        for x in range(3):
            assert pipeline.forward({"x": x})
        pipeline.stop_loop()
        stats = pipeline.stats()
        assert (stats.delivered, stats.dropped, stats.lost) == (2, 1, 0)
        assert all(worker.restarts == 0 for worker in stats.workers)
