"""The Ray actor behind one worker of ``parallelize(cluster=...)``: it runs on the node Ray
placed it on and starts the very worker process a local pipeline runs there
(``child.start``), a child of the actor.

The actor keeps the child's stdin pipe, as the orchestrator does locally, so the worker's
``ParentWatch`` is the whole lifetime rule: when the actor ends -- ``ray.kill``, its node
lost, the driver gone (Ray ends a driver's actors with it) -- the pipe closes and the worker
exits by itself, removing this actor's private folder as an orphan does.

What differs from a local worker is only where files are: the worker's CURVE allow-list
is written again here, on the node (the orchestrator's folder is on another machine), and
the folder the worker removes if orphaned is this actor's own.

This module is imported on the nodes; it imports Ray nowhere at its top, so that the
package loads without Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import tempfile
import threading

from pystream_zmq import child
from pystream_zmq.wire import security
from pystream_zmq.worker.spec import WorkerSpec, write_spec

WORKER_MODULE = "pystream_zmq.worker.main"


class UnitHost:
    """One worker process at a time (a restart on the same node starts the next one)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="pystream-ray-")  # mode 0700
        # A threaded actor runs its calls concurrently and in no set order: a launch must
        # neither interleave with a stop (which would miss the worker it starts) nor start
        # a worker after it (nobody would stop that one).
        self._lock = threading.Lock()
        self._stopped = False

    def launch(self, defaults: dict[str, str], overrides: dict[str, str]) -> tuple[str, str, int]:
        """Start a worker process, which waits for its spec: (node id, node address, pid).
        ``defaults`` and ``overrides`` go around this node's own environment."""
        import ray

        with self._lock:
            if self._stopped:
                raise RuntimeError("this unit host was stopped: it starts no more workers")
            self._stop(grace=0.0)  # a previous worker has exited already, or is replaced
            os.makedirs(self._dir, mode=0o700, exist_ok=True)  # an orphan removed it
            env = {**defaults, **os.environ, **overrides}
            self._proc = child.start(WORKER_MODULE, env=env)
            pid = self._proc.pid
        node = ray.get_runtime_context().get_node_id()
        return node, ray.util.get_node_ip_address(), pid

    def send_spec(self, spec: WorkerSpec, blob: bytes) -> None:
        """Write the worker's spec and stages to its stdin; OSError if it has exited."""
        assert self._proc is not None and self._proc.stdin is not None
        if spec.curve is not None and spec.curve.allow is not None:
            allow = os.path.join(self._dir, f"allow-{self._proc.pid}")
            security.write_allow_dir(allow, spec.curve.public)
            spec = dataclasses.replace(spec, curve=dataclasses.replace(spec.curve, allow=allow))
        write_spec(self._proc.stdin, dataclasses.replace(spec, ipc_dir=self._dir), blob)

    def wait_exit(self, pid: int) -> int:
        """Block (in a thread of this threaded actor) until worker ``pid`` exits: its code."""
        proc = self._proc
        if proc is None or proc.pid != pid:
            return -1  # replaced already
        return proc.wait()

    def kill(self, pid: int | None = None) -> None:
        """Kill the worker now (only if it is still ``pid``) and wait for it."""
        proc = self._proc
        if proc is not None and (pid is None or proc.pid == pid) and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1.0)

    def stop(self, grace: float) -> int | None:
        """Close the worker's stdin (its cue to exit after BYE), terminate and kill it if it
        has not exited within ``grace``; remove this actor's folder. Its exit code."""
        with self._lock:
            self._stopped = True
            code = self._stop(grace)
        shutil.rmtree(self._dir, ignore_errors=True)
        return code

    def _stop(self, grace: float) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        child.stop([proc], grace)
        return proc.returncode
