from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import stages

import pystream_zmq
from pystream_zmq.profiling import store


def profiled_two_stages(**settings: float) -> pystream_zmq.Pipeline:
    """A profiled pipeline of two stages adding one, parallelized with ``settings``."""
    pipeline = pystream_zmq.Pipeline(use_profiler=True)
    pipeline.add(stages.add_one, "StageA")
    pipeline.add(stages.add_one, "StageB")
    pipeline.parallelize(**settings)
    return pipeline


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` against a deadline (never a bare sleep-then-assert)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every test must leave no child process behind."""
    yield
    me = psutil.Process()
    assert wait_until(lambda: not me.children(recursive=True), timeout=10), [
        p.cmdline() for p in me.children(recursive=True)
    ]


@pytest.fixture(autouse=True)
def profile_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / "profiles"
    monkeypatch.setenv(store.PROFILE_DIR_ENV, str(folder))
    pystream_zmq.set_profiler_db_folder(folder)
    yield folder
    store._db_folder = None  # private: PyStream's API sets the folder but has no reset
