"""Starting a plan's worker processes and stopping them: each process gets its
``WorkerSpec`` and stages on stdin and says READY on the control channel; the supervisor
has a dead one started again; at the end, every process is stopped and the private socket
folder removed -- even if the orchestrator is never closed (a weakref finalizer), but
never by a child this process forked: the workers and the folder are not the child's.

Every process is started before any is told what to run, so that their imports overlap.
Over ipc every process gets its spec at once. Over tcp a port is known only once bound
(links.py), so the units get theirs from the last back to the first: each binds before the
one that sends to it connects.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import types
import weakref
from collections import ChainMap
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import cloudpickle

from pystream_zmq import child, threads
from pystream_zmq.errors import WorkerStartupError
from pystream_zmq.orchestrator import links
from pystream_zmq.orchestrator.control import Control
from pystream_zmq.orchestrator.deadline import SLICE_MS, Deadline
from pystream_zmq.orchestrator.settings import ParallelSettings
from pystream_zmq.plan import Plan
from pystream_zmq.shm import pools
from pystream_zmq.wire import transport
from pystream_zmq.worker.spec import WorkerSpec, write_spec

log = logging.getLogger(__name__)

# glibc returns freed 1 MB blocks to the kernel at once, so every received frame would
# fault in fresh pages; keep them (measured 1.16x on 1 MB frames).
_MALLOC_KEEP_FREED = {"MALLOC_MMAP_THRESHOLD_": "16777216", "MALLOC_TRIM_THRESHOLD_": "134217728"}


def dump_stages(leaves: object) -> bytes:
    """A unit's stages as its worker reads them: cloudpickled (by value where they are not
    importable), with the file names of their code kept, so that a stage's traceback names
    the user's file and line, not cloudpickle's "<dynamic-code>"."""
    with io.BytesIO() as file:
        _StagePickler(file).dump(leaves)
        return file.getvalue()


def _code_reduce(code: types.CodeType) -> tuple[Any, tuple[Any, ...]]:
    make, args = cloudpickle.Pickler.dispatch_table[types.CodeType](code)
    return make, tuple(code.co_filename if arg == "<dynamic-code>" else arg for arg in args)


class _StagePickler(cloudpickle.Pickler):
    dispatch_table: ClassVar = ChainMap(
        {types.CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table
    )


class WorkerProcess(Protocol):
    """What the supervisor and stats() read of a worker: a local ``Popen``, or a process a
    cluster launcher started on a node (ray_launcher.RayWorker)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...


P = TypeVar("P", bound=WorkerProcess)


class BaseLauncher(Generic[P]):
    """The worker processes of ``plan``, one per ``plan.processes`` entry (same index), and
    where they meet: ``links`` names the endpoints, in the private folder ``socket_dir``.
    ``profile``: the workers send profile records to the "profile" link; ``worker_cpus``:
    the CPU of each process (pin_cpus), or None. How a process is started, given its spec,
    restarted and stopped is the subclass's (``Launcher``: local child processes)."""

    def __init__(
        self,
        plan: Plan,
        settings: ParallelSettings,
        *,
        profile: bool,
        worker_cpus: Sequence[int | None],
    ) -> None:
        host = links.check(settings.endpoint, curve=settings.curve, insecure=settings.insecure)
        self._plan = plan
        self._settings = settings
        self._profile = profile
        self._worker_cpus = list(worker_cpus)
        self.names = [p.name for p in plan.processes]
        # The size of every worker's native thread pools; None: left alone.
        self.native_threads = threads.per_worker(
            settings.native_threads, len(plan.processes), pinned=settings.pin_cpus
        )
        self.procs: list[P] = []  # the supervisor watches this list
        # Called with {link name: new endpoint} when a restarted process bound its inputs
        # at another address (a cluster node): what sends to them must connect there.
        self.on_moved: Callable[[dict[str, str]], None] = lambda moved: None
        self.ready: set[int] = set()  # the processes that said READY: they answer commands
        self._blobs: list[bytes] = []  # each unit's stages, cloudpickled once
        self._control: Control | None = None  # admits each process started (start())
        self.socket_dir = tempfile.mkdtemp(prefix="pystream-")
        # Shared-memory pools: the orchestrator's (0), then one per worker process (i + 1).
        self.shm_fds: list[int] = []
        # type(self): a bound method would keep this object alive, and the finalizer unrun.
        self._finalizer = weakref.finalize(
            self, type(self).teardown, self.procs, self.socket_dir, self.shm_fds, owner=os.getpid()
        )
        try:
            if settings.uses_shm:
                pool_bytes = int(settings.shm_pool_mb * 2**20)
                self.shm_fds.extend(pools.create_pools(len(plan.processes) + 1, pool_bytes))
            self.links = links.Links(self.socket_dir, host, settings.curve)
        except BaseException:
            self._finalizer()
            raise

    def alive(self, but: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """The processes that said READY and still run (``but`` those)."""
        return [i for i in sorted(self.ready - but) if self.procs[i].poll() is None]

    def node_of(self, index: int) -> tuple[str | None, str | None]:
        """(node id, node address) of the cluster node process ``index`` runs on; (None,
        None) on this machine."""
        return None, None

    def pid_of(self, index: int) -> int | None:
        return self.procs[index].pid if 0 <= index < len(self.procs) else None

    def start(self, control: Control) -> None:
        """Start every process and wait, up to ``startup_timeout``, until all are ready;
        WorkerStartupError names the stage that could not start."""
        self._control = control
        for unit in self._plan.units:
            try:
                self._blobs.append(dump_stages(unit.leaves))
            except Exception as e:
                raise WorkerStartupError(
                    unit.name, f"it cannot be sent to a worker process ({e!r})"
                ) from e
        self.procs.extend(self._start_process(p.index) for p in self._plan.processes)
        batches = [[p.index for p in self._plan.processes]]
        if self.links.bind_first:
            units = reversed(range(len(self._plan.units)))
            batches = [[p.index for p in self._plan.processes if p.unit == u] for u in units]
        deadline = Deadline(self._settings.startup_timeout)
        for batch in batches:
            for index in batch:
                self._send_spec(index)
            self._wait_ready(control, set(batch), deadline)

    def relaunch(self, index: int) -> None:
        """Start process ``index`` again, from its stage's original definition; it joins the
        stream where it is, and its READY is left to the control channel."""
        raise NotImplementedError

    def kill(self, index: int, pid: int | None = None) -> None:
        """Kill process ``index`` now (only if it is still ``pid``): it is stuck in a stage
        call, and would answer nothing."""
        raise NotImplementedError

    def close(self, grace: float = 1.0) -> None:
        """Let every process exit within ``grace`` (terminate, then kill, what does not)."""
        raise NotImplementedError

    def _start_process(self, index: int) -> P:
        """Start the process that will be ``plan.processes[index]`` (its spec comes later)."""
        raise NotImplementedError

    def _deliver(self, index: int, spec: WorkerSpec, blob: bytes) -> None:
        """Hand process ``index`` its spec and its unit's stages; WorkerStartupError if it
        cannot take them."""
        raise NotImplementedError

    def _input_endpoint(self, index: int, name: str) -> str:
        """Where process ``index`` binds its input ``name``."""
        return self.links.endpoint(name)

    def _send_spec(self, index: int, restarted: bool = False) -> None:
        process = self._plan.processes[index]
        unit = self._plan.units[process.unit]
        assert self._control is not None
        token = self._control.admit(index)
        pulls = [self._input_endpoint(index, name) for name in process.binds]
        pushes = [self.links.endpoint(name) for name in process.connects]
        spec = WorkerSpec(
            name=unit.name,
            pull=pulls[0],
            push=pushes[0],
            more_pulls=tuple(pulls[1:]),
            more_pushes=tuple(pushes[1:]),
            ordered_input=process.ordered_input,
            first_seq=None if restarted else 0,
            replica=process.replica if unit.replicas > 1 else None,
            profile=self.links.endpoint("profile") if self._profile else None,
            hwm=self._settings.hwm,
            max_message_bytes=self._settings.max_message_bytes,
            control=self.links.endpoint(links.CONTROL),
            ident=str(index).encode(),
            token=token,
            control_curve=self.links.control_curve,
            sys_path=list(sys.path),
            log_level=logging.getLogger("pystream_zmq").getEffectiveLevel(),
            forward_log_level=int(self._settings.worker_log_level),  # a number by now
            raise_on=unit.raise_on,
            ipc_dir=self.socket_dir,
            drop_policy=unit.drop_policy,
            max_age=self._settings.max_age,
            curve=self.links.curve,
            cpu=self._worker_cpus[index],
            native_threads=self.native_threads,
            status=self.links.endpoint("status"),
            process=index,
            limits=unit.limits_by_path(),
            shm_fds=tuple(self.shm_fds),
            shm_sends=index + 1 if self.shm_fds else None,
        )
        self._deliver(index, spec, self._blobs[process.unit])

    @staticmethod
    def teardown(
        procs: list[Any], directory: str, shm_fds: list[int], grace: float = 1.0, owner: int = 0
    ) -> None:
        """Stop ``procs`` within ``grace``, remove ``directory`` and close the shared-memory
        pools ``shm_fds``; only in the ``owner``
        process (when given): a child forked from it that exits must leave them. Also run,
        by a finalizer, when the launcher is dropped without close()."""
        raise NotImplementedError

    def worker_environment(self) -> tuple[dict[str, str], dict[str, str]]:
        """(defaults, overrides) of a worker's environment around its parent's own."""
        overrides: dict[str, str] = {}
        if self.native_threads:  # in the environment: the libraries read it as they load
            overrides = threads.environment(self.native_threads)
        return dict(_MALLOC_KEEP_FREED), overrides

    def _wait_ready(self, control: Control, waiting: set[int], deadline: Deadline) -> None:
        while waiting:
            found = control.next_message(min(SLICE_MS, deadline.left_ms()))
            if found is not None:
                index, (kind, *rest) = found
                if kind == transport.FAILED:
                    detail = b"".join(rest).decode(errors="replace").strip()
                    raise WorkerStartupError(
                        self.names[index], detail.rpartition("\n")[2] + "\n" + detail
                    )
                waiting.discard(index)
                self.ready.add(index)
                binds = self._plan.processes[index].binds
                for name, bound in zip(binds, rest, strict=False):  # where it bound them
                    self.links.record(name, bound.decode(errors="replace"))
                continue
            for index in sorted(waiting):
                code = self.procs[index].poll()
                if code is not None:
                    raise WorkerStartupError(
                        self.names[index], f"its process exited with code {code}"
                    )
            if not deadline.left():
                names = ", ".join(self.names[i] for i in sorted(waiting))
                raise WorkerStartupError(
                    names, f"not ready after {self._settings.startup_timeout:g} s"
                )


def _teardown(
    procs: list[subprocess.Popen[bytes]],
    directory: str,
    shm_fds: list[int],
    grace: float = 1.0,
    owner: int = 0,
) -> None:
    """Let workers exit, stop those that do not; remove the socket files; close the pools
    (each one's memory goes with the last process that maps it). Only in the ``owner``
    process (when given): a child forked from it that exits must leave them."""
    if owner and os.getpid() != owner:
        return
    child.stop(procs, grace)
    shutil.rmtree(directory, ignore_errors=True)
    pools.close_pools(shm_fds)
    shm_fds.clear()


class Launcher(BaseLauncher[subprocess.Popen[bytes]]):
    """Worker processes on this machine, children of this one (``child.start``)."""

    def relaunch(self, index: int) -> None:
        """Start process ``index`` again, from its stage's original definition; it joins the
        stream where it is, and its READY is left to the control channel."""
        old = self.procs[index]
        if old.stdin is not None:
            with contextlib.suppress(OSError):
                old.stdin.close()
        self.procs[index] = self._start_process(index)
        self._send_spec(index, restarted=True)

    def kill(self, index: int, pid: int | None = None) -> None:
        """Kill process ``index`` now (only if it is still ``pid``): it is stuck in a stage
        call, and would answer nothing."""
        proc = self.procs[index]
        if (pid is None or proc.pid == pid) and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1.0)  # so that it no longer counts as alive

    def close(self, grace: float = 1.0) -> None:
        """Let every process exit within ``grace`` (terminate, then kill, what does not);
        remove the socket folder. Each exit code is logged (DEBUG)."""
        self._finalizer.detach()
        self.teardown(self.procs, self.socket_dir, self.shm_fds, grace)
        for name, proc in zip(self.names, self.procs, strict=False):
            log.debug("worker %s (pid %d) exited with code %s", name, proc.pid, proc.returncode)

    teardown = staticmethod(_teardown)

    def _start_process(self, index: int) -> subprocess.Popen[bytes]:
        defaults, overrides = self.worker_environment()
        env = {**defaults, **os.environ, **overrides}
        return child.start("pystream_zmq.worker.main", env=env, pass_fds=self.shm_fds)

    def _deliver(self, index: int, spec: WorkerSpec, blob: bytes) -> None:
        stdin = self.procs[index].stdin
        assert stdin is not None
        try:
            write_spec(stdin, spec, blob)
        except OSError as e:  # the process died before reading its spec
            raise WorkerStartupError(spec.name, f"its process exited at start ({e})") from e
