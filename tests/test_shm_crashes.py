"""Shared memory after kill -9: of a worker (restarted, it rejoins its pool), of the
orchestrator, of every process at once (nothing is left in /dev/shm, no process holds a
pool), and of a receiver holding leases (the sender takes them back)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import stages
from conftest import wait_until
from shm_checks import dev_shm, holders_of_pools, left_in_dev_shm
from test_seed_notebook import _env, alive

from pystream_zmq import Pipeline
from pystream_zmq.shm import sender as sender_module
from pystream_zmq.shm.handoff import Handoff
from pystream_zmq.shm.pools import Shared, close_pools, create_pools
from pystream_zmq.wire import codec

SHAPE = (480, 720, 3)


def test_kill_9_of_a_worker_leaves_nothing_and_its_restart_rejoins_the_pool() -> None:
    before = dev_shm()
    with Pipeline() as pipeline:
        pipeline.add(stages.add_to_buffer, "First")
        pipeline.add(stages.add_to_buffer, "Middle")
        pipeline.add(stages.add_to_buffer, "Last")
        pipeline.parallelize(input_timeout=30, block_output=True)
        victim = pipeline.stats().workers[1].pid
        sender = threading.Thread(target=lambda: [
            pipeline.forward({"x": x, "buffer": np.full(SHAPE, x % 200, np.uint8)})
            for x in range(300)
        ])  # fmt: skip
        sender.start()
        assert wait_until(lambda: pipeline.stats().delivered > 30)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: pipeline.stats().workers[1].restarts == 1, timeout=5)
        sender.join(timeout=60)
        assert not sender.is_alive()
        pipeline.stop_loop()
        stats = pipeline.stats()
        assert stats.forwarded == 300 and stats.dropped == 0
        assert stats.delivered + stats.lost == stats.forwarded and stats.delivered > 30
        last = pipeline.get_results()
        assert last["x"] == 302 and (last["buffer"] == 299 % 200 + 3).all()
        # After the restart, the new process sends through its pool again.
        middle = "MainPipeline__Middle"
        sent_before = pipeline.stats().stages[middle]["shm_arrays"]
        for x in range(10):
            assert pipeline.forward({"x": x, "buffer": np.full(SHAPE, x, np.uint8)})
            item = pipeline.get_results()
            assert item["x"] == x + 3 and (item["buffer"] == x + 3).all()
        counters = pipeline.stats().stages[middle]
        assert counters["shm_arrays"] == sent_before + 10 and counters["shm_full"] == 0, counters
    assert not left_in_dev_shm(before)


ORCHESTRATOR = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import stages
    from pystream_zmq import Pipeline

    pipeline = Pipeline()
    pipeline.add(stages.add_to_buffer, "A")
    pipeline.add(stages.add_to_buffer, "B")
    pipeline.parallelize(block_output=True)
    kept = []
    for x in range(10):
        pipeline.forward({{"x": x, "buffer": np.full((480, 720, 3), x, np.uint8)}})
        kept.append(pipeline.get_results())
    assert all((item["buffer"] == item["x"]).all() for item in kept)
    print(" ".join(str(w.pid) for w in pipeline.stats().workers), flush=True)
    sys.stdin.read()  # until the test kills us
""")


@pytest.mark.parametrize("victims", ["orchestrator", "all"])
def test_kill_9_of_the_orchestrator_or_of_all_leaves_no_pool_behind(
    tmp_path: Path, victims: str
) -> None:
    before = dev_shm()
    script = tmp_path / "orchestrator.py"
    script.write_text(ORCHESTRATOR.format(tests=str(Path(__file__).parent)))
    env = {**_env(), "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        workers = [psutil.Process(int(pid)) for pid in proc.stdout.readline().split()]
        assert len(workers) == 2
        assert proc.pid in holders_of_pools(but=os.getpid()) and all(
            w.pid in holders_of_pools(but=os.getpid()) for w in workers
        )
        if victims == "all":
            for worker in workers:
                worker.kill()
        proc.kill()
        proc.wait(timeout=10)
        assert wait_until(lambda: not any(map(alive, workers)), timeout=10)
        assert wait_until(lambda: not holders_of_pools(but=os.getpid()), timeout=10), (
            holders_of_pools(but=os.getpid())
        )
        assert not left_in_dev_shm(before)
    finally:
        proc.kill()
        proc.communicate(timeout=10)


HOLDER = textwrap.dedent("""
    import sys
    from pystream_zmq.shm.pools import Shared
    from pystream_zmq.wire import codec

    shared = Shared([int(sys.argv[1])], sends=None)
    held = [codec.decode([bytes.fromhex(line)], shared=shared.views) for line in sys.argv[2:]]
    print("held", flush=True)
    sys.stdin.read()
""")


def test_leases_of_a_receiver_killed_holding_them_are_taken_back_when_short() -> None:
    fds = create_pools(1, 3 * 2**20)  # room for 3 arrays of 1 MB
    try:
        sender = Shared(fds, sends=0)
        assert sender.allocator is not None
        image = np.ones(2**20, np.uint8)
        headers = [codec.encode_shared({"i": image}, sender.allocator)[0][0] for _ in range(3)]
        env = {**_env(), "PYTHONPATH": str(Path(__file__).parent.parent)}
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(fds[0]), *(bytes(h).hex() for h in headers)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, pass_fds=fds,
        )  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
            assert sender.allocator.place(image) is None  # full: the holder is alive
            holder.kill()
            holder.wait(timeout=10)
            spot = sender.allocator.place(image)  # taken back from the dead holder
            assert spot is not None and sender.allocator.counters["shm_full"] == 1
        finally:
            holder.kill()
            holder.communicate(timeout=10)
    finally:
        close_pools(fds)


def test_a_restarted_sender_takes_up_its_pool_where_its_predecessor_left_it() -> None:
    """What a receiver still holds stays out of use for the new sender too."""
    fds = create_pools(1, 2 * 2**20)  # room for 2 arrays of 1 MB
    try:
        first = Shared(fds, sends=0)
        assert first.allocator is not None
        frames, _ = codec.encode_shared({"i": np.full(2**20, 7, np.uint8)}, first.allocator)
        kept = codec.decode(frames, shared=first.views)
        again = Shared(fds, sends=0)  # a new sender on the same pool
        assert again.allocator is not None
        assert again.allocator.place(np.zeros(2**20, np.uint8)) is not None
        assert again.allocator.place(np.zeros(2**20, np.uint8)) is None  # the kept one's
        assert (kept["i"] == 7).all()
    finally:
        close_pools(fds)


def _pass_on(fds: list[int], count: int, wait: float = 0.0) -> tuple[Shared, list[bytes]]:
    """``count`` arrays of 1 MB placed in pool 0 by its sender, received by a middle
    process (this one) and, ``wait`` seconds later, passed on without a copy: (the
    sender, the headers sent on)."""
    sender = Shared(fds, sends=0)
    middle = Shared(fds, sends=1)
    assert sender.allocator is not None and middle.allocator is not None
    handoff = Handoff(middle.allocator, middle.views)
    headers = []
    for _ in range(count):
        frames, _ = codec.encode_shared({"i": np.ones(2**20, np.uint8)}, sender.allocator)
        box = [codec.decode(frames, shared=middle.views)]
        time.sleep(wait)
        handoff.prepare(box)
        item = box.pop()
        headers.append(bytes(codec.encode_shared(item, handoff)[0][0]))
        handoff.done()
        del item
    assert handoff.counters["shm_passed"] == count and not middle.views.held
    return sender, headers


def test_passed_leases_of_a_receiver_killed_holding_them_are_taken_back_when_short() -> None:
    fds = create_pools(2, 3 * 2**20)  # room for 3 arrays of 1 MB
    try:
        sender, headers = _pass_on(fds, 3)
        assert sender.allocator is not None
        assert sender.allocator.place(np.ones(2**20, np.uint8)) is None  # in flight: kept
        env = {**_env(), "PYTHONPATH": str(Path(__file__).parent.parent)}
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(fds[0]), *(h.hex() for h in headers)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, pass_fds=fds,
        )  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
            assert sender.allocator.place(np.ones(2**20, np.uint8)) is None  # alive: kept
            holder.kill()
            holder.wait(timeout=10)
            assert sender.allocator.place(np.ones(2**20, np.uint8)) is not None  # dead pid
        finally:
            holder.kill()
            holder.communicate(timeout=10)
    finally:
        close_pools(fds)


def test_a_passed_lease_nobody_claims_is_an_orphan_counted_from_when_it_was_passed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sender_module, "ORPHAN_AFTER", 0.5)
    fds = create_pools(2, 2**20)  # room for one
    try:
        sender, _ = _pass_on(fds, 1, wait=0.6)  # sent longer ago than ORPHAN_AFTER
        assert sender.allocator is not None
        assert sender.allocator.place(np.ones(2**20, np.uint8)) is None  # just passed: kept
        time.sleep(0.6)
        assert sender.allocator.place(np.ones(2**20, np.uint8)) is not None  # an orphan now
    finally:
        close_pools(fds)
