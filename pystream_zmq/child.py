"""The orchestrator's child processes (workers and the profile writer): how one is started,
how it notices that its parent has gone, how it leaves, and how it is stopped.

A child reads what it needs from its stdin and keeps stdin open for its whole life: EOF
means the orchestrator is done with it -- or dead, even by ``kill -9`` -- so no child
outlives the process that started it. A process the orchestrator forks (``os.fork``,
multiprocessing) gets those pipes pointed at /dev/null at once, so that it cannot hold
them open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

log = logging.getLogger(__name__)

EXIT_ORPHANED = 3  # the child's stdin closed before it was done: its parent has gone
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


def log_format(name: str) -> str:
    """Log lines carry the process's role (a stage path, "profile writer") and its pid."""
    return f"%(asctime)s %(levelname)s [{name} pid %(process)d] %(name)s: %(message)s"


def command(module: str, *args: str) -> list[str]:
    """The command line that runs ``module``'s ``main()`` in a fresh interpreter.

    Not ``-m module``: this package imports its child modules, and runpy warns about it.
    ``-c`` puts the working directory first on sys.path, where a folder named pystream_zmq
    (another checkout, say) would be imported instead of this package: import ours, then
    give the path back."""
    code = (
        f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); "
        f"from {module} import main; sys.path.remove({_PACKAGE_ROOT!r}); main()"
    )
    return [sys.executable, "-c", code, *args]


_started: weakref.WeakSet[subprocess.Popen[bytes]] = weakref.WeakSet()


def start(
    module: str, *args: str, env: Mapping[str, str] | None = None, pass_fds: Sequence[int] = ()
) -> subprocess.Popen[bytes]:
    """Start ``module``'s ``main()`` as a child with a pipe on its stdin; ``pass_fds``: open
    file descriptors it inherits, under the same numbers (shared-memory pools)."""
    proc = subprocess.Popen(
        command(module, *args), stdin=subprocess.PIPE, env=env, pass_fds=tuple(pass_fds)
    )
    _started.add(proc)
    return proc


def _release_pipes_after_fork() -> None:
    """In a forked process: our children's stdin pipes now lead to /dev/null (the file
    objects stay valid), so that our children see EOF when we, their parent, close them or
    die, not only once every forked copy has gone too."""
    pipes = [p.stdin for p in list(_started) if p.stdin is not None and not p.stdin.closed]
    if not pipes:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for pipe in pipes:
            with contextlib.suppress(OSError, ValueError):
                os.dup2(devnull, pipe.fileno())
    finally:
        os.close(devnull)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_release_pipes_after_fork)


class ParentWatch:
    """In the child: a thread reads stdin to its end. ``finished`` is set by the child once
    its work is done; EOF before that means the parent has gone, and the child exits at once
    with EXIT_ORPHANED (after ``on_orphaned``), since nobody will read what it sends.
    ``stdin_closed`` is the parent's acknowledgement after a normal stop."""

    def __init__(self, on_orphaned: Callable[[], None] | None = None) -> None:
        self.finished = threading.Event()
        self.stdin_closed = threading.Event()
        self._on_orphaned = on_orphaned
        threading.Thread(target=self._watch, name="pystream-parent-watch", daemon=True).start()

    def _watch(self) -> None:
        sys.stdin.buffer.read()  # returns only at EOF
        self.stdin_closed.set()
        if not self.finished.is_set():
            log.info("orchestrator has gone away; exiting")
            if self._on_orphaned is not None:
                self._on_orphaned()
            leave(EXIT_ORPHANED)


def leave(code: int) -> NoReturn:
    """Exit the child process now, with everything it wrote flushed. os._exit: the parent
    watch is still blocked in read(), and a normal interpreter shutdown aborts on the lock
    that read() holds."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def stop(procs: Sequence[subprocess.Popen[bytes]], grace: float = 1.0) -> None:
    """In the parent: close each child's stdin (its cue to exit), wait up to ``grace``
    seconds, then terminate and kill whatever is left."""
    for proc in procs:
        if proc.stdin is not None and not proc.stdin.closed:
            with contextlib.suppress(OSError):  # a dead child's pipe may be broken
                proc.stdin.close()
    wait_all(procs, grace)
    for step in (subprocess.Popen.terminate, subprocess.Popen.kill):
        alive = [proc for proc in procs if proc.poll() is None]
        if not alive:
            return
        log.warning("%s %d process(es) that did not exit in time", step.__name__, len(alive))
        for proc in alive:
            step(proc)
        wait_all(alive, 1.0)


def wait_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float) -> None:
    end = time.monotonic() + timeout
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, end - time.monotonic()))
