"""``parallelize(cluster=...)``: the plan's processes started on a Ray cluster, each by a
small actor (ray_host.UnitHost) on a node that has the unit's ``add(resources=,
num_cpus=)`` free; the replicas of a unit are spread over the nodes (Ray's SPREAD). Ray
places; everything else is the local pipeline's: the same worker process, spec, links
(ZeroMQ over tcp, the addresses of ray_cluster.py), control channel, profiles, ledger.

Faults are this package's supervisor's, not Ray's (``max_restarts=0`` on every actor): it
polls each worker as it does a local process. A worker that exits is started again by the
same actor, on the same node and ports. An actor that is lost (its node gone, or killed)
is replaced by a new one wherever the unit fits; its worker binds the same ports at its new
node's address, and ``on_moved`` has whatever sends to it connect there. Either way the
items the worker held are counted lost by sequence number, as locally.

The actors are the driver's (not detached): Ray ends them when the driver exits, and their
workers follow (ray_host.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import threading
from typing import Any

from pystream_zmq.errors import WorkerStartupError
from pystream_zmq.orchestrator import ray_cluster
from pystream_zmq.orchestrator.launcher import BaseLauncher
from pystream_zmq.orchestrator.ray_host import UnitHost
from pystream_zmq.orchestrator.settings import ParallelSettings
from pystream_zmq.plan import Plan
from pystream_zmq.wire import endpoints, security
from pystream_zmq.worker.spec import WorkerSpec

log = logging.getLogger(__name__)

ACTOR_LOST = -255  # the exit code a worker gets when its actor or node is lost
DEFAULT_NUM_CPUS = 1.0  # a worker process keeps a CPU busy
_ACTOR_THREADS = 4  # wait_exit blocks one of them; kill and stop need others
_CALL_TIMEOUT = 10.0  # seconds for an actor call that should take milliseconds


class RayWorker:
    """The driver's handle on one worker: its actor, where it runs, and its exit (a pending
    ``wait_exit`` call), polled without blocking like a local ``Popen``."""

    def __init__(self, actor: Any, launched: Any) -> None:
        self.actor = actor
        self._launched = launched  # ObjectRef of (node id, node address, pid)
        self._exit: Any = None  # ObjectRef of the exit code, once launched
        self._lock = threading.Lock()  # the supervisor and the runner both poll
        self.code: int | None = None
        self.node_id: str | None = None
        self.node_address: str | None = None
        self._pid = -1
        self.lost = False  # its actor or node is gone: a restart needs a new actor

    @property
    def pid(self) -> int:
        return self._pid

    def wait_launched(self, timeout: float) -> str:
        """Wait until the actor has been placed and started the worker: its node address.
        GetTimeoutError when no node could take it in time."""
        ray = ray_cluster.import_ray()
        if self.node_address is None:
            node_id, address, pid = ray.get(self._launched, timeout=timeout)
            with self._lock:
                self.node_id, self.node_address, self._pid = node_id, address, pid
                self._exit = self.actor.wait_exit.remote(pid)
        assert self.node_address is not None
        return self.node_address

    def poll(self) -> int | None:
        ray = ray_cluster.import_ray()
        with self._lock:
            if self.code is not None:
                return self.code
            ref = self._exit if self._exit is not None else self._launched
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                return None
            try:
                value = ray.get(ref)
            except ray.exceptions.RayError:  # the actor died, or its node did
                self.lost = True
                self.code = ACTOR_LOST
                return self.code
            if ref is self._exit:
                self.code = int(value)
            return self.code  # launched (None), or the worker's exit code

    def pending(self) -> Any:
        """The ObjectRef that resolves once its worker is known to have exited or its actor
        to have died: the exit code's, else (launch not yet read) the launch's."""
        with self._lock:
            return self._exit if self._exit is not None else self._launched

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the worker to exit (it may not)."""
        ray = ray_cluster.import_ray()
        if self._exit is not None:
            ray.wait([self._exit], timeout=timeout)
        self.poll()


class RayLauncher(BaseLauncher[RayWorker]):
    """The plan's processes on a Ray cluster; see the module docstring."""

    def __init__(
        self, plan: Plan, settings: ParallelSettings, *, profile: bool, **_: object
    ) -> None:
        assert settings.cluster is not None
        self._owns_connection = ray_cluster.connect(settings.cluster)
        try:
            given = settings.endpoint
            host = None if given is None else endpoints.parse(given).host
            self.addresses = ray_cluster.addresses(host)
            self.addresses.check_keys_travel(insecure=settings.insecure)
            # The orchestrator's own sockets (control, status, profile, sink) bind there.
            here = dataclasses.replace(settings, endpoint=f"tcp://{self.addresses.orchestrator}")
            super().__init__(plan, here, profile=profile, worker_cpus=[None] * len(plan.processes))
        except BaseException:
            self._disconnect()
            raise
        self._actor_class = ray_cluster.import_ray().remote(UnitHost)

    # -- where ---------------------------------------------------------------------------
    def node_of(self, index: int) -> tuple[str | None, str | None]:
        worker = self.procs[index]
        return worker.node_id, worker.node_address

    def _input_endpoint(self, index: int, name: str) -> str:
        """Where it bound this input before (a restart binds it again), else a port the OS
        chooses at its node's address."""
        bound = self.links.bound().get(name)
        if bound is not None:
            return bound
        node = self.addresses.node_host(self._launched(index))
        endpoint = f"tcp://{endpoints.address(node, '*')}"
        security.check_bind(
            endpoint,
            secured=self.links.curve is not None,
            insecure=self._settings.insecure,
            hint="pass curve=True (encrypted, authenticated links) or insecure=True",
        )
        return endpoint

    def _launched(self, index: int) -> str:
        worker, unit = self.procs[index], self._plan.units[self._plan.processes[index].unit]
        try:
            return worker.wait_launched(self._settings.startup_timeout)
        except Exception as e:
            ray = ray_cluster.import_ray()
            if isinstance(e, ray.exceptions.GetTimeoutError):
                raise WorkerStartupError(
                    self.names[index],
                    f"no node of the Ray cluster could take it within "
                    f"{self._settings.startup_timeout:g} s: it needs num_cpus="
                    f"{_num_cpus(unit.placement.num_cpus):g} and resources "
                    f"{dict(unit.placement.resources)}",
                ) from e
            raise WorkerStartupError(self.names[index], f"its Ray actor failed ({e})") from e

    # -- starting ------------------------------------------------------------------------
    def _start_process(self, index: int) -> RayWorker:
        unit = self._plan.units[self._plan.processes[index].unit]
        options: dict[str, Any] = {
            "num_cpus": _num_cpus(unit.placement.num_cpus),
            "resources": dict(unit.placement.resources),
            "max_concurrency": _ACTOR_THREADS,
            "max_restarts": 0,  # the supervisor restarts (module docstring)
        }
        if unit.replicas > 1:
            options["scheduling_strategy"] = "SPREAD"
        actor = self._actor_class.options(**options).remote()
        return RayWorker(actor, actor.launch.remote(*self.worker_environment()))

    def _deliver(self, index: int, spec: WorkerSpec, blob: bytes) -> None:
        ray = ray_cluster.import_ray()
        self._launched(index)
        try:
            ray.get(self.procs[index].actor.send_spec.remote(spec, blob), timeout=_CALL_TIMEOUT)
        except Exception as e:  # its process or its actor died before reading its spec
            raise WorkerStartupError(spec.name, f"could not be given its spec ({e})") from e

    def relaunch(self, index: int) -> None:
        """Start it again: by the same actor if it lives (same node, same ports), else by a
        new one wherever it fits, binding the same ports at that node's address."""
        old = self.procs[index]
        if old.lost:
            with contextlib.suppress(Exception):
                ray_cluster.import_ray().kill(old.actor)
            self.procs[index] = self._start_process(index)
        else:
            self.procs[index] = RayWorker(
                old.actor, old.actor.launch.remote(*self.worker_environment())
            )
        moved = self._rebind(index)
        self._send_spec(index, restarted=True)
        if moved:
            self.on_moved(moved)

    def _rebind(self, index: int) -> dict[str, str]:
        """Its inputs' endpoints at its (new) node's address, same ports: {name: endpoint}
        of those that changed."""
        host = self.addresses.node_host(self._launched(index))
        moved: dict[str, str] = {}
        bound = self.links.bound()
        for name in self._plan.processes[index].binds:
            if name not in bound:
                continue
            old = endpoints.parse(bound[name])
            new = f"tcp://{endpoints.address(host, str(old.port))}"
            if new != bound[name]:
                log.warning("worker %s moved: %s is now at %s", self.names[index], name, new)
                self.links.record(name, new)
                moved[name] = new
        return moved

    def kill(self, index: int, pid: int | None = None) -> None:
        worker = self.procs[index]
        if pid is not None and worker.pid != pid:
            return
        with contextlib.suppress(Exception):  # its actor may be gone: then so is the worker
            ray = ray_cluster.import_ray()
            ray.get(worker.actor.kill.remote(pid), timeout=_CALL_TIMEOUT)
        worker.wait(1.0)  # so that it no longer counts as alive

    # -- stopping ------------------------------------------------------------------------
    def close(self, grace: float = 1.0) -> None:
        self._finalizer.detach()
        self.teardown(self.procs, self.socket_dir, self.shm_fds, grace)
        for name, worker in zip(self.names, self.procs, strict=False):
            log.debug("worker %s (pid %d) exited with code %s", name, worker.pid, worker.code)
        self._disconnect()

    def _disconnect(self) -> None:
        if self._owns_connection:
            self._owns_connection = False
            ray_cluster.import_ray().shutdown()

    @staticmethod
    def teardown(
        procs: list[Any], directory: str, shm_fds: list[int], grace: float = 1.0, owner: int = 0
    ) -> None:
        """Have every actor stop its worker within ``grace``, then end the actors (no pools:
        shared memory is for one host, ``shm_fds`` stays empty)."""
        if owner and os.getpid() != owner:
            return
        shutil.rmtree(directory, ignore_errors=True)
        ray = ray_cluster.import_ray()
        if not ray.is_initialized():  # the connection is gone, and with it the actors
            return
        # An actor never placed (no node fits it) would take the call only once placed; one
        # whose launch answered has a worker, even if that answer is still unread here.
        launches = [worker._launched for worker in procs]
        answered: list[Any] = []
        with contextlib.suppress(Exception):
            answered, _ = ray.wait(launches, num_returns=len(launches), timeout=0)
        stops = [
            worker.actor.stop.remote(grace)
            for worker, launch in zip(procs, launches, strict=True)
            if worker.node_address or launch in answered
        ]
        with contextlib.suppress(Exception):
            ray.wait(stops, num_returns=len(stops), timeout=grace + _CALL_TIMEOUT)
        for worker in procs:
            with contextlib.suppress(Exception):
                ray.kill(worker.actor)
        # ray.kill only asks: the actor process, which holds its worker's stdin pipe, ends
        # later -- seconds later on a busy machine -- and with it a worker its stop missed.
        # Return only once Ray reports every worker exited or its actor dead.
        ends = [worker.pending() for worker in procs]
        with contextlib.suppress(Exception):
            ray.wait(ends, num_returns=len(ends), timeout=_CALL_TIMEOUT)
        for worker in procs:  # the exit codes, for close()'s log
            with contextlib.suppress(Exception):
                worker.wait(0.0)


def _num_cpus(num_cpus: float | None) -> float:
    return DEFAULT_NUM_CPUS if num_cpus is None else num_cpus
