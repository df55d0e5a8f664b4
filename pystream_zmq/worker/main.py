"""An orchestrated worker process: started by the orchestrator (``child.start``), it reads
its spec and stages from stdin, reports READY on the control channel, runs its stages until
told to stop, says BYE, and exits once the orchestrator closes its stdin. When stdin closes
earlier, the orchestrator has gone, and the worker exits at once (``child.ParentWatch``)."""

from __future__ import annotations

import logging
import shutil
import signal
import sys
import threading
import traceback
from typing import Any

import zmq

from pystream_zmq import child, cpus, threads
from pystream_zmq.wire import security, transport
from pystream_zmq.worker import logs
from pystream_zmq.worker.loop import Worker
from pystream_zmq.worker.spec import WorkerSpec, read_spec

log = logging.getLogger(__name__)

_EXIT_GRACE = 10.0  # after STOP, how long to wait for stdin to close before exiting anyway


def serve(
    spec: WorkerSpec,
    stages_blob: bytes,
    finished: threading.Event,
    stdin_closed: threading.Event,
    repeats: logs.Repeats,
) -> int:
    import cloudpickle

    if spec.control is None:
        raise ValueError("an orchestrated worker needs the control endpoint")
    ctx: zmq.Context[Any] = zmq.Context()
    auth = security.start_authenticator(ctx, spec.curve)
    control = transport.make_socket(ctx, zmq.DEALER, 1000)
    # No routing id of our own: ZeroMQ gives the connection one, and the token says who we are.
    security.connect(control, spec.control, spec.control_curve)
    try:
        try:
            leaves = cloudpickle.loads(stages_blob)
            worker = Worker(spec, leaves, ctx)
        except Exception:
            log.exception("could not start")
            finished.set()
            failure = traceback.format_exc().encode()
            control.send_multipart([transport.FAILED, spec.token, failure])
            stdin_closed.wait(_EXIT_GRACE)
            return 1
        forwarder = None
        if spec.status is not None:
            forwarder = logs.forward(
                ctx, spec.status, spec.curve, spec.forward_log_level,
                process=spec.process, unit=spec.name, current=lambda: worker.chain.current,
            )  # fmt: skip
        control.send_multipart([transport.READY, spec.token, *(e.encode() for e in worker.bound)])
        try:
            worker.run(control)
            finished.set()
            worker.finish(control)
        finally:
            repeats.flush()
            if forwarder is not None:  # before the context goes: its socket is in it
                forwarder.repeats.flush()
                logging.getLogger().removeHandler(forwarder)
                forwarder.close()
        stdin_closed.wait(_EXIT_GRACE)
        return 0
    finally:
        security.stop_authenticator(auth)
        ctx.destroy(linger=0)


def main() -> None:
    # A stage's print() reaches a file or a pipe line by line, as it would in a terminal.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    spec, stages_blob = read_spec(sys.stdin.buffer)
    if spec.cpu is not None:  # first, so that the threads started below inherit it
        cpus.pin_this_thread(spec.cpu)
    sys.path[:0] = [p for p in spec.sys_path if p not in sys.path]
    repeats = logs.to_stderr(spec.name, spec.log_level)
    if spec.native_threads:  # before the stages are unpickled, and load their libraries
        loaded = threads.limit(spec.native_threads)
        log.info("native thread pools: %d threads (loaded: %s)", spec.native_threads, loaded)
    # Ctrl-C in a terminal reaches the whole process group: the orchestrator decides what
    # happens, and it stops its workers through the control channel or by closing stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ipc_dir = spec.ipc_dir
    # An orphan removes the orchestrator's socket files, which nobody else will now.
    parent = child.ParentWatch(
        on_orphaned=None if ipc_dir is None else lambda: shutil.rmtree(ipc_dir, True)
    )
    child.leave(serve(spec, stages_blob, parent.finished, parent.stdin_closed, repeats))
