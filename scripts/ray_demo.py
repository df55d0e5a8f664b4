"""The same pipeline, unchanged, on local worker processes and then on a Ray cluster of
several nodes started here (ray.cluster_utils.Cluster), with stages placed by resource:
where each stage ran, its outputs in order, and its profiles. Needs the ray extra
(pip install 'pystream-zmq[ray]'); about 30 s on 2 cores.

    python scripts/ray_demo.py [--items 200]

Each node of the local cluster has a loopback address of its own (127.0.0.2, ...), so the
links run between distinct addresses, as across hosts, while nothing leaves this machine.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from pystream_zmq import Pipeline, Stage


class Camera(Stage):
    """Stands for a stage that must run on the host with the camera."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        self.count += 1
        data["image"] = np.full((120, 160, 3), data["i"] % 256, np.uint8)
        return data

    def cleanup(self) -> None:
        self.count = 0


def infer(data: dict[str, Any]) -> dict[str, Any]:
    """Stands for a stage that needs the GPU."""
    data["mean"] = float(data["image"].mean())
    return data


def build(items: int) -> tuple[Pipeline, Camera]:
    """The user's pipeline: written once, with its placement, for both runs."""
    camera = Camera()
    pipeline = Pipeline(({"i": i} for i in range(items)), use_profiler=True)
    pipeline.add(camera, "Camera", resources={"camera0": 1})
    pipeline.add(infer, "Infer", resources={"gpu": 1}, replicas=2)
    return pipeline, camera


def run(pipeline: Pipeline, camera: Camera, **where: Any) -> list[dict[str, Any]]:
    pipeline.parallelize(**where)
    try:
        results = pipeline.results()
        pipeline.start_loop(0.0)
        outputs = list(results)
        pipeline.stop_loop()
        print(f"  Camera.count after stop_loop(): {camera.count}")
        for worker in pipeline.stats().workers:
            print(f"  {worker.name:28} pid {worker.pid:7}  node {worker.node_address}")
        latency, throughput = pipeline.get_profiles()
        for path in sorted(latency):
            print(f"  {path:28} {latency[path] * 1e3:7.2f} ms  {throughput[path]:8.1f} items/s")
        return outputs
    finally:
        pipeline.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--items", type=int, default=200)
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    print("local processes:")
    local = run(*build(args.items))

    started = time.monotonic()
    small = {"object_store_memory": 80 * 2**20}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, **small},
    )
    try:
        cluster.add_node(node_ip_address="127.0.0.2", num_cpus=1, resources={"camera0": 1}, **small)
        for address in ("127.0.0.3", "127.0.0.4"):
            cluster.add_node(node_ip_address=address, num_cpus=1, resources={"gpu": 1}, **small)
        ray.init(address=cluster.address, logging_level="WARNING")
        print(f"Ray cluster of 4 nodes up in {time.monotonic() - started:.1f} s:")
        for node in ray.nodes():
            custom = {k: v for k, v in node["Resources"].items() if k in ("camera0", "gpu")}
            print(f"  {node['NodeManagerAddress']:10} {custom}")
        print('parallelize(cluster="ray"):')
        on_ray = run(*build(args.items), cluster="ray")
    finally:
        ray.shutdown()
        cluster.shutdown()
    same = [o["mean"] for o in on_ray] == [o["mean"] for o in local]
    print(f"{len(on_ray)} outputs, in order and equal to the local run's: {same}")


if __name__ == "__main__":
    main()
