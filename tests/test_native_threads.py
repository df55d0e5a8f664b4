"""parallelize(native_threads=...): each worker's native thread pools (OpenCV, BLAS) get a
fair share of the CPUs by default, a set size when given, and are left alone when turned
off; the caller's own process is never touched. pystream-worker --native-threads likewise.
Every check is made by a stage in a real worker, asking the libraries themselves."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import psutil
import pytest
import stages
import threadpoolctl
import zmq
from conftest import wait_until

from pystream_zmq import Pipeline, threads
from pystream_zmq.orchestrator.settings import ParallelSettings
from pystream_zmq.wire import codec, transport

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CPUS = threads.usable_cpus()
needs_two_cpus = pytest.mark.skipif(
    CPUS < 2, reason="on one CPU the fair share, the default and 1 are all the same"
)

_REPORT = (
    "import json, cv2, threadpoolctl; "
    "pools = threadpoolctl.threadpool_info(); "
    "blas = sorted({p['num_threads'] for p in pools if p['user_api'] == 'blas'}); "
    "print(json.dumps([cv2.getNumThreads(), blas]))"
)


def untouched() -> list[Any]:
    """[OpenCV's threads, BLAS pool sizes] in a fresh interpreter with this environment."""
    done = subprocess.run(
        [sys.executable, "-c", _REPORT], capture_output=True, text=True, check=True, timeout=60
    )
    return list(json.loads(done.stdout))


def this_process() -> list[Any]:
    blas = {p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"}
    return [cv2.getNumThreads(), sorted(blas)]


def expected(size: int) -> list[Any]:
    """What a process limited to ``size`` threads reports: every BLAS pool at ``size``."""
    return [size, [size] if untouched()[1] else []]


@dataclass
class Seen:
    threads: list[Any]  # each worker's [OpenCV threads, BLAS pool sizes], from its stage
    reported: list[int | None]  # each worker's size, as stats() reports it
    launched_with: list[str | None]  # OPENBLAS_NUM_THREADS in each worker's environment


def seen_by_workers(workers: int, **settings: Any) -> Seen:
    with Pipeline() as pipeline:
        for i in range(workers):
            pipeline.add(stages.native_threads, f"Threads{i}")
        pipeline.parallelize(**settings)
        assert pipeline.forward({})
        pipeline.stop_loop()
        stats = pipeline.stats().workers
        # /proc/PID/environ: what the process started with, before any of its own changes.
        environs = [psutil.Process(worker.pid).environ() for worker in stats]
        result = pipeline.get_results()
    assert result is not None
    return Seen(
        result["threads"],
        [worker.native_threads for worker in stats],
        [env.get("OPENBLAS_NUM_THREADS") for env in environs],
    )


# -- the setting -----------------------------------------------------------------------------
def test_the_fair_share_divides_the_usable_cpus_among_the_workers() -> None:
    assert threads.per_worker("auto", 1) == CPUS
    assert threads.per_worker("auto", 2) == max(1, CPUS // 2)
    assert threads.per_worker("auto", CPUS + 1) == 1  # never below one
    assert threads.per_worker("auto", 1, pinned=True) == 1  # one CPU each
    assert threads.per_worker(3, 10) == 3
    assert threads.per_worker(None, 2) is None
    assert threads.per_worker(0, 2) is None


@pytest.mark.parametrize("bad", [-1, "many", 1.5, True])
def test_a_bad_setting_is_refused_before_anything_starts(bad: object) -> None:
    with pytest.raises(ValueError, match="native_threads must be"):
        ParallelSettings(native_threads=bad)  # type: ignore[arg-type]


# -- real workers ----------------------------------------------------------------------------
@needs_two_cpus
def test_by_default_each_worker_gets_a_fair_share_and_the_caller_is_left_alone() -> None:
    before = this_process()
    share = CPUS // 2
    seen = seen_by_workers(2)
    assert seen.threads == [expected(share)] * 2
    assert seen.reported == [share, share]
    # Set at launch, so that numpy's OpenBLAS, loaded before the worker reads its spec,
    # starts no threads beyond its share.
    assert seen.launched_with == [str(share)] * 2
    assert this_process() == before


@needs_two_cpus
def test_a_set_size_is_what_every_worker_gets() -> None:
    # One worker: its fair share would be every CPU; 1 is what it was told.
    seen = seen_by_workers(1, native_threads=1)
    assert seen.threads == [expected(1)]
    assert seen.reported == [1]
    assert seen.launched_with == ["1"]


@needs_two_cpus
@pytest.mark.parametrize("off", [None, 0])
def test_turned_off_the_workers_keep_the_libraries_defaults(off: int | None) -> None:
    seen = seen_by_workers(2, native_threads=off)
    assert seen.threads == [untouched()] * 2
    assert untouched()[0] != CPUS // 2  # else this test could not tell
    assert seen.reported == [None, None]
    assert seen.launched_with == [os.environ.get("OPENBLAS_NUM_THREADS")] * 2


def test_a_library_loaded_before_the_limit_is_limited_too() -> None:
    """cv2 and numpy's BLAS already loaded (as in pystream-worker): set in place."""
    code = (
        "import cv2, numpy; from pystream_zmq import threads; "
        f"print(sorted(set(threads.limit(1)))); {_REPORT}"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    limited, report = done.stdout.splitlines()
    assert "opencv" in limited
    assert json.loads(report) == expected(1)


# -- pystream-worker -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@needs_two_cpus
def test_pystream_worker_takes_the_size_from_its_option(tmp_path: Path) -> None:
    in_port, out_port = free_port(), free_port()
    log_path = tmp_path / "worker.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]),
        "PYSTREAM_NATIVE_THREADS": "1",
    }
    ctx: zmq.Context[Any] = zmq.Context()
    downstream = ctx.socket(zmq.PULL)
    downstream.setsockopt(zmq.LINGER, 0)
    downstream.bind(f"tcp://127.0.0.1:{out_port}")
    upstream = ctx.socket(zmq.PUSH)
    upstream.setsockopt(zmq.LINGER, 0)
    upstream.connect(f"tcp://127.0.0.1:{in_port}")
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [BIN / "pystream-worker", "stage", "stages:native_threads",
             "--pull", f"tcp://127.0.0.1:{in_port}", "--push", f"tcp://127.0.0.1:{out_port}"],
            stdout=out, stderr=out, env=env,
        )  # fmt: skip
    try:
        assert wait_until(lambda: "ready: input" in log_path.read_text(), 30), log_path.read_text()
        assert "native threads 1" in log_path.read_text()
        upstream.send_multipart(
            transport.pack_message(transport.KIND_DATA, 0, time.time(), codec.encode({}))
        )
        assert downstream.poll(30_000), log_path.read_text()
        output = codec.decode(transport.payload(downstream.recv_multipart()))
        assert output == {"threads": [expected(1)]}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ctx.destroy(linger=0)
