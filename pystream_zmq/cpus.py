"""Optional CPU placement, ``parallelize(pin_cpus=True)``: each worker process stays on one
CPU, and the orchestrator's helper threads (ZeroMQ's I/O thread and the collector) on
another, taken round-robin from the CPUs this process may use.

Left to the scheduler, the threads of the two ends of a link wander between CPUs, and a
small-item pipeline ran at 17-40k items/s from one start to the next; placed, at 39-47k
every time. Placement helps only when the pipeline is the machine's main load and there
are about as many CPUs as processes: otherwise pinned workers cannot move away from a busy
CPU. The caller's own threads are never pinned.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def plan(workers: int) -> tuple[int, list[int]]:
    """(the orchestrator's CPU, one CPU per worker), round-robin over the allowed CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if workers + 1 > len(cpus):
        log.warning(
            "pin_cpus: %d worker processes and this one share %d CPUs; pinned, they cannot "
            "move off a busy CPU (1 MB frames through 3 stages on 2 CPUs ran 25 %% slower)",
            workers,
            len(cpus),
        )
    return cpus[0], [cpus[(i + 1) % len(cpus)] for i in range(workers)]


def pin_this_thread(cpu: int) -> None:
    """Keep the calling thread, and the threads it starts from now on, on ``cpu``."""
    os.sched_setaffinity(0, {cpu})  # on Linux, 0 is the calling thread, not the process
