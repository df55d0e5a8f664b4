"""A stage that stalls is reported while it stalls, a deadline restarts its worker, stop and
cleanup stay within their bounds around a hung stage; the state copy-back brings back only
what changed, and leaves an attribute over its cap in the worker with one warning."""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any

import numpy as np
import pytest
from conftest import wait_until

from pystream_zmq import Pipeline, Stage
from pystream_zmq.errors import DecodeError
from pystream_zmq.plan import Limits
from pystream_zmq.wire import codec, status

STALL_AFTER = 0.3
DRAIN_TIMEOUT = 1.5
STOP_TIMEOUT = 2.0
SLACK = 1.5  # a loaded machine's scheduling, on top of a bound


class Hang(Stage):
    """Gets stuck on the item whose x is ``bad``: in Python code, or asleep."""

    def __init__(self, bad: int, how: str = "busy", seconds: float = 1e9) -> None:
        self.bad, self.how, self.seconds = bad, how, seconds
        self.count = 0

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        self.count += 1
        if data["x"] == self.bad:
            if self.how == "busy":
                end = time.monotonic() + self.seconds
                while time.monotonic() < end:  # holds the GIL but for the switch interval
                    pass
            else:
                time.sleep(self.seconds)
        return data

    def cleanup(self) -> None:
        pass


class Count(Stage):
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, data: Any) -> Any:
        self.count += 1
        return data

    def cleanup(self) -> None:
        pass


def exit_codes(caplog: pytest.LogCaptureFixture) -> dict[str, int]:
    """{worker: exit code}, as the launcher logs them at close."""
    found = re.findall(r"worker (\S+) \(pid \d+\) exited with code (-?\d+)", caplog.text)
    return {name: int(code) for name, code in found}


def stall_warnings(caplog: pytest.LogCaptureFixture, stage: str, item: int) -> list[str]:
    prefix = f"stage {stage} has been running item {item} for "
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
        and r.name.startswith("pystream_zmq")
        and r.getMessage().startswith(prefix)
        and "stall_after" in r.getMessage()
    ]


@pytest.mark.parametrize("how", ["busy", "sleep"])
def test_a_hung_stage_is_warned_about_while_stuck_and_stop_and_cleanup_stay_bounded(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pystream_zmq")
    first, hang, last = Count(), Hang(bad=1, how=how), Count()
    pipeline = Pipeline()
    pipeline.add(first, "First")
    pipeline.add(hang, "Hang", stall_after=STALL_AFTER)
    pipeline.add(last, "Last")
    pipeline.parallelize(drain_timeout=DRAIN_TIMEOUT, stop_timeout=STOP_TIMEOUT)
    try:
        for x in range(3):
            assert pipeline.forward({"x": x})
        # While it is stuck, in this process's logging, naming the stage and the item.
        assert wait_until(lambda: stall_warnings(caplog, "MainPipeline__Hang", 1), timeout=10)
        started = time.monotonic()
        # Repeated while it stays stuck, at doubling intervals: not a flood.
        assert wait_until(
            lambda: len(stall_warnings(caplog, "MainPipeline__Hang", 1)) >= 3, timeout=10
        )
        stuck_for = time.monotonic() - started + STALL_AFTER
        assert len(stall_warnings(caplog, "MainPipeline__Hang", 1)) <= 2 + math.log2(
            stuck_for / STALL_AFTER
        )

        began = time.monotonic()
        pipeline.stop_loop()
        took = time.monotonic() - began
        assert took < DRAIN_TIMEOUT + SLACK, took  # the stuck worker is not asked for state
        assert (first.count, last.count) == (3, 1)  # the healthy ones' state came back
        assert "not asked for its state" in caplog.text
        assert "the drain did not finish: stage MainPipeline__Hang has been running item 1" in (
            caplog.text
        )
    finally:
        began = time.monotonic()
        pipeline.cleanup()
        took = time.monotonic() - began
    assert took < DRAIN_TIMEOUT + SLACK, took
    assert "stopping the pipeline: stage MainPipeline__Hang has been running item 1" in (
        caplog.text
    )
    # Only the stuck worker was killed; the others were stopped as usual and exited 0.
    assert exit_codes(caplog) == {
        "MainPipeline__First": 0,
        "MainPipeline__Hang": -9,
        "MainPipeline__Last": 0,
    }
    assert "did not exit in time" not in caplog.text  # nobody terminated


def test_a_stage_that_finishes_late_says_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pystream_zmq")
    slow = Hang(bad=0, how="sleep", seconds=1.0)
    with Pipeline() as pipeline:
        pipeline.add(slow, "Slow", stall_after=STALL_AFTER)
        pipeline.parallelize(block_output=True, output_timeout=10)
        assert pipeline.forward({"x": 0})
        assert pipeline.get_results() == {"x": 0}
        assert wait_until(lambda: "finished item 0 late" in caplog.text)
        assert stall_warnings(caplog, "MainPipeline__Slow", 0)
        line = next(r.getMessage() for r in caplog.records if "late" in r.getMessage())
        seconds = float(re.search(r"after ([0-9.]+) s", line).group(1))  # type: ignore[union-attr]
        assert 0.9 <= seconds <= 2.0, line
        # The worker is not taken for stuck any more: its state comes back.
        pipeline.stop_loop()
        assert slow.count == 1
        assert "not asked for its state" not in caplog.text


def test_a_stage_past_its_deadline_is_restarted_and_its_item_counted_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pystream_zmq")
    with Pipeline() as pipeline:
        pipeline.add(Count(), "First")
        pipeline.add(Hang(bad=2, how="sleep"), "Hang", deadline=1.0)
        pipeline.parallelize(drain_timeout=20)
        for x in range(3):
            assert pipeline.forward({"x": x})
        assert wait_until(lambda: "ran past its deadline" in caplog.text, timeout=15)
        assert wait_until(lambda: pipeline.stats().workers[1].restarts == 1, timeout=15)
        for x in range(3, 6):
            assert pipeline.forward({"x": x})
        pipeline.stop_loop()
        stats = pipeline.stats()
        assert stats.forwarded == 6
        assert stats.forwarded == stats.delivered + stats.dropped + stats.lost
        assert any(first <= 2 <= last for first, last in stats.lost_ranges), stats.lost_ranges
        assert stats.delivered >= 2 + 3  # before it, and everything after the restart
        assert [w.restarts for w in stats.workers] == [0, 1]
    line = next(r.getMessage() for r in caplog.records if "deadline" in r.getMessage())
    assert line.startswith("stage MainPipeline__Hang: item 2 ran past its deadline of 1 s"), line
    assert "was ended (stage MainPipeline__Hang: item 2 ran past its deadline" in caplog.text


# -- the state copy-back ---------------------------------------------------------------------
class Holder(Stage):
    """Counts items, keeps a histogram changed in place, and a big array made in the worker
    (so that it does not travel with the stage)."""

    def __init__(self, big_bytes: int) -> None:
        self.big_bytes = big_bytes
        self.count = 0
        self.histogram = np.zeros(8, np.int64)
        self.label = "local"
        self.big: np.ndarray[Any, Any] | None = None

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        if self.big is None:
            self.big = np.zeros(self.big_bytes, np.uint8)  # calloc: no page is touched
        self.count += 1
        self.histogram[data["x"] % 8] += 1  # in place: the same object, new content
        return data

    def cleanup(self) -> None:
        pass


def kept_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "stays in the worker" in r.getMessage()]


def test_an_attribute_over_its_cap_stays_in_the_worker_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pystream_zmq")
    holder = Holder(big_bytes=2 * 2**20)
    with Pipeline() as pipeline:
        pipeline.add(holder, "Holder", max_attribute_bytes=2**20)
        pipeline.parallelize()
        for x in range(3):
            assert pipeline.forward({"x": x})
        pipeline.stop_loop()
        assert holder.count == 3  # the others came back
        assert holder.big is None  # the local object keeps its own value
        assert pipeline.forward({"x": 3})
        pipeline.stop_loop()
        assert holder.count == 4
    warnings = kept_warnings(caplog)
    assert len(warnings) == 1, warnings  # once, though every copy-back leaves it there
    assert "stage MainPipeline__Holder: attribute 'big'" in warnings[0]
    assert "over max_attribute_bytes=1048576" in warnings[0]


def test_a_600_mb_attribute_no_longer_breaks_the_copy_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under the default cap (64 MiB): the issue's case, cheap since no page is touched."""
    caplog.set_level(logging.WARNING, logger="pystream_zmq")
    holder = Holder(big_bytes=600_000_000)
    with Pipeline() as pipeline:
        pipeline.add(holder, "Holder")
        pipeline.parallelize()
        assert pipeline.forward({"x": 1})
        pipeline.stop_loop()
        assert holder.count == 1
        assert holder.histogram.tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert "unreadable state" not in caplog.text
    assert len(kept_warnings(caplog)) == 1


def test_only_attributes_changed_in_the_worker_come_back() -> None:
    holder = Holder(big_bytes=1)
    with Pipeline() as pipeline:
        pipeline.add(holder, "Holder")
        pipeline.parallelize()
        assert pipeline.forward({"x": 1})
        pipeline.stop_loop()
        assert (holder.count, holder.histogram[1], holder.label) == (1, 1, "local")
        # Set here, unchanged in the worker: not sent again, so not overwritten.
        holder.label = "set here"
        holder.big = None
        assert pipeline.forward({"x": 1})
        pipeline.stop_loop()
        assert holder.count == 2
        assert holder.histogram.tolist() == [0, 2, 0, 0, 0, 0, 0, 0]  # changed in place
        assert holder.label == "set here"
        assert holder.big is None


def test_a_reply_that_came_too_late_is_sent_again(caplog: pytest.LogCaptureFixture) -> None:
    """The state reply that missed stop_timeout held the change; the next copy-back asks
    for everything, so the change is not lost."""
    caplog.set_level(logging.WARNING, logger="pystream_zmq")
    slow = Hang(bad=0, how="sleep", seconds=2.5)
    with Pipeline() as pipeline:
        pipeline.add(slow, "Slow")  # the default stall_after: it is not taken for stuck
        pipeline.parallelize(drain_timeout=1.0, stop_timeout=0.5)
        assert pipeline.forward({"x": 0})
        pipeline.stop_loop()  # the drain and the state request give up on it
        assert slow.count == 0
        assert "stage MainPipeline__Slow has been running item 0" in caplog.text
        assert "so it did not answer" in caplog.text
        pipeline.stop_loop()  # the item is done by the end of this drain
        assert slow.count == 1


# -- settings and the status wire format -----------------------------------------------------
@pytest.mark.parametrize(
    "setting", [{"stall_after": 0}, {"deadline": -1.0}, {"max_attribute_bytes": "big"}]
)
def test_limits_are_checked_at_add(setting: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(setting))):
        Pipeline().add(Count(), "C", **setting)


def test_a_child_pipeline_passes_its_limits_to_its_stages() -> None:
    child = Pipeline()
    child.add(Count(), "A")
    child.add(Count(), "B", stall_after=2.0)
    child.serialize()
    try:
        parent = Pipeline()
        parent.add(child.as_stage(), "Child", deadline=5.0, stall_after=7.0)
        (unit,) = parent.plan().units
    finally:
        child.cleanup()
    by_path = unit.limits_by_path()
    assert by_path["MainPipeline__Child__A"].resolved() == (7.0, 5.0, 64 * 2**20)
    assert by_path["MainPipeline__Child__B"].resolved() == (2.0, 5.0, 64 * 2**20)
    assert Limits().resolved() == (10.0, math.inf, 64 * 2**20)


def test_status_messages_are_checked() -> None:
    report = status.Report(0, 123, "MainPipeline__A", 7, 1.5, True, 0.3)
    assert status.unpack(status.pack(status.RUNNING, report)) == (status.RUNNING, report)
    bad = [
        [b"nope", *codec.encode([0, 1, "p", 2, 1.0, True, 1.0])],
        [status.DONE, *codec.encode([0, 1, "p", 2, 1.0, True])],
        [status.DONE, *codec.encode([0, 1, b"p", 2, 1.0, True, 1.0])],
        [status.DONE, b"\xc1"],
    ]
    for message in bad:
        with pytest.raises(DecodeError):
            status.unpack(message)
