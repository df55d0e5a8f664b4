"""parallelize(cluster="ray") on a real Ray cluster of several nodes started here
(ray.cluster_utils.Cluster): each node has a loopback address of its own, so the links run
between distinct addresses as across hosts. Marked ``ray``; skipped without Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import stages
from conftest import wait_until

import pystream_zmq
from pystream_zmq.orchestrator import ray_cluster

ray = pytest.importorskip(
    "ray", reason="Ray is not installed (pip install 'pystream-zmq[ray]'): the ray tests skip"
)
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(150)]

_PACKAGE_ROOT = str(Path(pystream_zmq.__file__).resolve().parents[1])
CAMERA, GPU_A, GPU_B = "127.0.0.2", "127.0.0.3", "127.0.0.4"
_SMALL = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
# Ray notices a lost node in well under a second (its default: several seconds).
_FAST_HEALTH = {"health_check_period_ms": 200, "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, Any]]:
    """A head node and three more: one with the camera, two with a GPU each."""
    nodes: dict[str, Any] = {}
    head = Cluster(
        initialize_head=True,
        head_node_args={"include_dashboard": False, "_system_config": _FAST_HEALTH, **_SMALL},
    )
    try:
        nodes[CAMERA] = head.add_node(node_ip_address=CAMERA, resources={"camera0": 1}, **_SMALL)
        for address in (GPU_A, GPU_B):
            nodes[address] = head.add_node(node_ip_address=address, resources={"gpu": 1}, **_SMALL)
        ray.init(address=head.address, logging_level="WARNING")
        yield {"cluster": head, "nodes": nodes}
    finally:
        ray.shutdown()
        head.shutdown()
    me = psutil.Process()  # no raylet, GCS or Ray worker left
    assert wait_until(lambda: not me.children(recursive=True), timeout=20), [
        p.cmdline()[:3] for p in me.children(recursive=True)
    ]


def _our_workers() -> list[psutil.Process]:
    """The pystream worker processes of this checkout still running (another checkout's, on
    a shared machine, are not ours to count)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or ())
        if "pystream_zmq.worker.main" in line and _PACKAGE_ROOT in line:
            found.append(proc)
    return found


def _live_unit_hosts() -> list[str]:
    return [
        actor_id
        for actor_id, actor in ray._private.state.actors().items()
        if "UnitHost" in actor.get("ActorClassName", "") and actor.get("State") != "DEAD"
    ]


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Replaces conftest's: the cluster's own processes stay for the module; what each test
    must leave behind is no worker and no actor of ours."""
    yield
    assert wait_until(lambda: not _our_workers(), timeout=15), _our_workers()
    if ray.is_initialized():
        assert wait_until(lambda: not _live_unit_hosts(), timeout=15), _live_unit_hosts()


def _placed_pipeline(items: int, **infer: Any) -> tuple[pystream_zmq.Pipeline, stages.Counter]:
    camera = stages.Counter("Camera")
    pipeline = pystream_zmq.Pipeline(({"x": i} for i in range(items)), use_profiler=True)
    pipeline.add(camera, resources={"camera0": 1})
    pipeline.add(stages.add_one, "Infer", resources={"gpu": 1}, **infer)
    return pipeline, camera


def test_stages_run_on_the_nodes_that_have_their_resources(cluster: dict[str, Any]) -> None:
    items = 300
    pipeline, camera = _placed_pipeline(items, replicas=2)
    pipeline.parallelize(cluster="ray")
    try:
        outputs = pipeline.results()
        pipeline.start_loop(0.0)
        assert [o["x"] for o in outputs] == [i + 1 for i in range(items)]
        pipeline.stop_loop()
        assert camera.count == items  # the worker's count, copied back

        node_ids = {address: node.node_id for address, node in cluster["nodes"].items()}
        where = {w.name: (w.node_address, w.node_id) for w in pipeline.stats().workers}
        assert where["MainPipeline__Camera"] == (CAMERA, node_ids[CAMERA])
        gpus = {where["MainPipeline__Infer#0"], where["MainPipeline__Infer#1"]}
        assert gpus == {(GPU_A, node_ids[GPU_A]), (GPU_B, node_ids[GPU_B])}  # spread
        bound = pipeline.stats().endpoints
        assert bound["in0.0-0"].startswith(f"tcp://{CAMERA}:")

        latency, throughput = pipeline.get_profiles()
        for path in ("MainPipeline", "MainPipeline__Camera", "MainPipeline__Infer"):
            assert latency[path] > 0 and throughput[path] > 0
        report = pipeline.get_profile_report()
        assert report is not None and report.complete, report and report.warning()
    finally:
        pipeline.cleanup()
    assert camera.count == 0  # the stage's own cleanup(), as locally


def test_a_unit_that_fits_nowhere_is_named(cluster: dict[str, Any]) -> None:
    pipeline = pystream_zmq.Pipeline()
    pipeline.add(stages.add_one, "Lidar", resources={"lidar": 1})
    with pytest.raises(pystream_zmq.WorkerStartupError, match=r"Lidar.*lidar"):
        pipeline.parallelize(cluster="ray", startup_timeout=2)


def test_the_drivers_exit_ends_every_actor_and_worker(
    cluster: dict[str, Any], tmp_path: Path
) -> None:
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        import ray
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import stages
        from pystream_zmq import Pipeline

        ray.init(address={cluster["cluster"].address!r}, logging_level="WARNING")
        pipeline = Pipeline()
        pipeline.add(stages.add_one, "Camera", resources={{"camera0": 1}})
        pipeline.add(stages.add_one, "Infer", resources={{"gpu": 1}})
        pipeline.parallelize(cluster="ray")
        pipeline.forward({{"x": 1}})
        print("ready", flush=True)
        sys.stdin.read()
        """)
    )
    # Ray prints the autoscaler's events (the previous test's unplaceable "lidar" request)
    # to a driver's stdout, ahead of "ready": not here.
    driver = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "RAY_SCHEDULER_EVENTS": "0"},
    )
    try:
        assert driver.stdout is not None
        assert driver.stdout.readline() == b"ready\n"
        assert len(_our_workers()) >= 2  # (a third: one restarted, its old one leaving)
        os.kill(driver.pid, signal.SIGKILL)  # no cleanup(), no atexit
        driver.wait(10)
    finally:
        driver.kill()
        driver.communicate()  # and closes its pipes
    # the autouse fixture checks that the workers and the actors are gone


def test_a_node_lost_mid_stream(cluster: dict[str, Any]) -> None:
    """The node running a stage is removed (its raylet killed): the stage starts again on
    the other node that fits, what sends to it reconnects there, and every item is either
    delivered, in order, or counted lost."""
    items = 600
    pipeline, _ = _placed_pipeline(items)
    pipeline.parallelize(cluster="ray")
    try:
        outputs = pipeline.results()
        pipeline.start_loop(0.002)
        seen = [next(outputs)["x"] for _ in range(50)]
        before = {w.name: w for w in pipeline.stats().workers}["MainPipeline__Infer"]
        assert before.node_address in (GPU_A, GPU_B)
        cluster["cluster"].remove_node(cluster["nodes"].pop(before.node_address))
        seen += [o["x"] for o in outputs]
        stats = pipeline.stats()
    finally:
        pipeline.cleanup()

    after = {w.name: w for w in stats.workers}
    moved = after["MainPipeline__Infer"]
    assert moved.node_address in (GPU_A, GPU_B) and moved.node_address != before.node_address
    assert moved.restarts == 1 and moved.restart_reasons == {"died": 1}
    # The camera sent to the old address: restarted to connect to the new one.
    assert after["MainPipeline__Camera"].restart_reasons == {"relinked": 1}
    assert seen == sorted(set(seen)) and seen[-1] == items  # in order, none twice
    assert len(seen) > 50 + 100, "the pipeline did not go on after the node was lost"
    lost = sum(last - first + 1 for first, last in stats.lost_ranges)  # inclusive
    assert stats.forwarded == items
    assert stats.delivered + stats.dropped + stats.lost == items
    assert stats.lost == lost == items - len(seen)


def test_without_ray_the_message_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets when missing
    with pytest.raises(ImportError, match=r"pip install 'pystream-zmq\[ray\]'"):
        ray_cluster.import_ray()


def test_placement_is_checked_at_add_and_unread_locally() -> None:
    pipeline = pystream_zmq.Pipeline()
    with pytest.raises(ValueError, match="num_cpus"):
        pipeline.add(stages.add_one, num_cpus=-1)
    with pytest.raises(ValueError, match="num_cpus="):
        pipeline.add(stages.add_one, resources={"CPU": 2})
    with pytest.raises(ValueError, match="camera0"):
        pipeline.add(stages.add_one, resources={"camera0": float("nan")})
    pipeline.add(stages.add_one, "Placed", resources={"camera0": 1}, num_cpus=0.5)
    unit = pipeline.plan().units[0]
    assert unit.placement.resources == (("camera0", 1),) and unit.placement.num_cpus == 0.5
    with pipeline.parallelize():  # no cluster: this machine, whatever the stage asks for
        assert pipeline.forward({"x": 1})
        assert pipeline.join(10)
