"""What a ``pystream-worker`` process sets up once its command line is good: logging with its
name and pid, and the stop signals. SIGTERM/SIGINT (and SIGQUIT, which honcho's supervisord
export sends) ask for a drain; a second one exits at once with 128 + its number (143 / 130),
as shells do.
"""

from __future__ import annotations

import atexit
import logging
import signal
import socket
import sys
import threading

from pystream_zmq import child
from pystream_zmq.cli.roles import Stopping
from pystream_zmq.worker import logs

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def start(name: str, verbose: bool, drain_timeout: float) -> Stopping:
    """Log as ``name``, and turn stop signals into the returned Stopping's request."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # show up under honcho at once
    repeats = logs.to_stderr(name, logging.DEBUG if verbose else logging.INFO, force=True)
    atexit.register(repeats.flush)  # this process's entry point: the CLI's own exit
    stopping = Stopping(drain_timeout=drain_timeout)
    watch_signals(stopping)
    return stopping


def leaving() -> None:
    """The role is over: a stop signal now (honcho stops every process once one has ended)
    must not turn this exit into death by signal, which it would once the interpreter has
    put the default handlers back at shutdown."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def watch_signals(stopping: Stopping) -> None:
    """Turn SIGTERM/SIGINT/SIGQUIT into a stop request, a second one into an immediate exit.

    The Python-level handler does nothing: the interpreter also writes each signal's number
    to the wakeup fd, and a thread reading it sets ``stop``. So no lock is taken inside a
    handler (which could deadlock against the interrupted code), and it works whichever
    thread (numpy's, ZeroMQ's) the kernel delivered the signal to."""
    rx, tx = socket.socketpair()
    tx.setblocking(False)
    signal.set_wakeup_fd(tx.fileno(), warn_on_full_buffer=False)
    for signum in STOP_SIGNALS:
        signal.signal(signum, lambda *_: None)

    def watch(rx: socket.socket, tx: socket.socket) -> None:  # holds tx open: the wakeup fd
        name = signal.Signals(rx.recv(1)[0]).name
        stopping.request()
        log.info("%s: stopping (again to exit at once)", name)
        signum = rx.recv(1)[0]
        log.warning("second signal (%s): exiting at once", signal.Signals(signum).name)
        child.leave(128 + signum)

    threading.Thread(target=watch, args=(rx, tx), name="pystream-signals", daemon=True).start()
