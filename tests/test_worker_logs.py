"""A worker's words reach the user's own logging: stage errors and a stage's own log
records come out of the orchestrator's ``logging`` under ``pystream_zmq.stages.<path>``,
with the stage, the item, the worker's pid and a traceback that names the user's file;
floods are summarised while the counters stay exact. Real processes and sockets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import stages
from conftest import wait_until
from test_seed_notebook import _env

from pystream_zmq import Pipeline, Stage, StageError

STAGES = "pystream_zmq.stages"


def from_stages(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(STAGES)]


def test_a_stage_error_reaches_the_users_logging_with_its_item_and_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Defined here, inside the test, so the stage travels by value (cloudpickle): its
    traceback must still name this file and line, not "<dynamic-code>"."""

    def fail_on_one(data: dict[str, Any]) -> dict[str, Any]:
        if data["x"] == 1:
            raise ValueError("cannot take 1")  # the line the traceback must name
        return data

    caplog.set_level(logging.WARNING)
    with Pipeline() as pipeline:
        pipeline.add(fail_on_one, "Fail")
        pipeline.parallelize()
        for x in range(3):
            assert pipeline.forward({"x": x})
        pipeline.stop_loop()
        pid = pipeline.stats().workers[0].pid
        assert pipeline.stats().dropped == 1
    (record,) = from_stages(caplog)
    assert record.name == f"{STAGES}.MainPipeline.Fail"
    assert record.levelno == logging.ERROR
    assert "stage MainPipeline__Fail raised on item 1" in record.getMessage()
    assert (record.stage, record.seq, record.worker_pid) == ("MainPipeline__Fail", 1, pid)  # type: ignore[attr-defined]
    assert record.exc_text is not None
    assert f'File "{__file__}"' in record.exc_text
    assert 'raise ValueError("cannot take 1")' in record.exc_text  # the source line, read
    assert "<dynamic-code>" not in record.exc_text
    assert "ValueError: cannot take 1" in caplog.text  # a formatter prints the traceback


def test_stage_error_remote_traceback_names_the_users_file() -> None:
    def fail(data: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("missing")

    with Pipeline(on_error="raise") as pipeline:
        pipeline.add(fail, "Fail")
        pipeline.parallelize()
        assert pipeline.forward({"x": 1})
        with pytest.raises(StageError) as raised:  # from the first call after it arrived
            wait_until(lambda: pipeline.get_results() is not None)
    assert f'File "{__file__}"' in raised.value.remote_traceback
    assert "<dynamic-code>" not in raised.value.remote_traceback


class Chatty(Stage):
    """Logs on a logger of its own: a warning per item, an info line per item."""

    def __init__(self) -> None:
        self.name = "Chatty"

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        logging.getLogger("chatty").warning("looked at %d", data["x"])
        logging.getLogger("chatty").info("details of %d", data["x"])
        return data

    def cleanup(self) -> None:
        pass


@pytest.mark.parametrize(
    ("level", "levels"), [("WARNING", {"WARNING"}), (logging.INFO, {"INFO", "WARNING"})]
)
def test_a_stages_own_records_come_at_the_level_chosen(
    caplog: pytest.LogCaptureFixture, level: str | int, levels: set[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    with Pipeline() as pipeline:
        pipeline.add(Chatty())
        pipeline.parallelize(worker_log_level=level)
        assert pipeline.forward({"x": 7})
        pipeline.stop_loop()
    records = from_stages(caplog)
    assert {r.levelname for r in records} == levels
    for record in records:
        assert record.name == f"{STAGES}.MainPipeline.Chatty"
        assert record.seq == 0  # type: ignore[attr-defined]
        assert record.worker_logger == "chatty"  # type: ignore[attr-defined]
        assert record.getMessage().startswith("MainPipeline__Chatty: ")
    assert "MainPipeline__Chatty: looked at 7" in caplog.text


def test_a_flood_is_summarised_and_the_counters_stay_exact(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stage that raises on every one of 200 items: 3 errors in full, then one line for
    the other 197; the stage's counter says 200."""

    def always_fail(data: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError(f"no {data['x']}")

    caplog.set_level(logging.WARNING)
    with Pipeline() as pipeline:
        pipeline.add(always_fail, "Fail")
        pipeline.parallelize()
        for x in range(200):
            assert pipeline.forward({"x": x})
        pipeline.stop_loop()
        stats = pipeline.stats()
        assert (stats.dropped, stats.stages["MainPipeline__Fail"]["stage_errors"]) == (200, 200)
    records = from_stages(caplog)
    full = [r for r in records if "raised on item" in r.getMessage() and r.exc_text]
    assert [r.seq for r in full] == [0, 1, 2]  # type: ignore[attr-defined]
    summaries = [r for r in records if "more like this" in r.getMessage()]
    assert len(summaries) == 1
    assert summaries[0].getMessage().startswith("197 more like this in the last")
    assert "raised on item 199" in summaries[0].getMessage()
    assert len(records) == 4


def test_worker_log_level_is_checked() -> None:
    with Pipeline() as pipeline:
        pipeline.add(stages.add_one)
        with pytest.raises(ValueError, match="no logging level 'LOUD'"):
            pipeline.parallelize(worker_log_level="LOUD")


_CELL = """
from pystream_zmq import Pipeline

def fail_on_one(data):
    if data["x"] == 1:
        raise ValueError("cannot take 1")
    return data

with Pipeline() as pipeline:
    pipeline.add(fail_on_one, "Fail")
    pipeline.parallelize()
    for x in range(3):
        pipeline.forward({"x": x})
    pipeline.stop_loop()
print("DONE")
"""


def test_in_a_jupyter_kernel_a_stage_error_shows_in_the_cells_output(tmp_path: Path) -> None:
    """With no logging set up at all, as in a fresh notebook: Python's last-resort handler
    writes the record to the kernel's stderr, which the cell shows."""
    jupyter_client = pytest.importorskip("jupyter_client")
    manager, client = jupyter_client.manager.start_new_kernel(
        kernel_name="python3", cwd=str(tmp_path), env=_env()
    )
    try:
        msg_id = client.execute(_CELL)
        output = []
        while True:
            msg = client.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                output.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                pytest.fail("\n".join(msg["content"]["traceback"]))
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=False)
    text = "".join(output)
    assert "stage MainPipeline__Fail raised on item 1; the item is dropped" in text
    assert "ValueError: cannot take 1" in text
    assert text.rstrip().endswith("DONE")
