"""What ``Pipeline.parallelize()`` sets for its orchestrator, in one dataclass that the
runner and the launcher both read."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pystream_zmq import threads
from pystream_zmq.orchestrator import links
from pystream_zmq.shm import layout
from pystream_zmq.shm.pools import DEFAULT_POOL_MB
from pystream_zmq.wire import codec, transport

DEFAULT_MAX_IN_FLIGHT = 1000


@dataclass
class ParallelSettings:
    block_input: bool = True
    input_timeout: float = 10.0
    block_output: bool = False
    output_timeout: float = 10.0
    hwm: int = transport.DEFAULT_HWM
    startup_timeout: float = 30.0
    stop_timeout: float = 5.0
    max_restarts: int = 3
    drop_policy: str = transport.BLOCK  # at the source (forward())
    max_age: float | None = None
    endpoint: str | None = None  # "tcp://HOST": links over tcp there, not ipc files
    curve: bool = False  # CURVE on every link, with a key pair made for the run
    insecure: bool = False  # bind a non-loopback HOST without CURVE
    pin_cpus: bool = False  # a CPU per worker, one for our helper threads (cpus.py)
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT  # items sent and not yet out, at most
    max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES  # an item's encoding, at most
    # Workers' log records at or above it come out of this process's logging (a level name
    # or number; worker/logs.py); those below go to the workers' stderr.
    worker_log_level: int | str = logging.WARNING
    # Each worker's native thread pools (OpenCV, BLAS, OpenMP): "auto" for a fair share of
    # the CPUs, a number of threads, or None to leave them alone (threads.py).
    native_threads: int | str | None = threads.AUTO
    # "ray" (the ray.init() connection, else RAY_ADDRESS or a local `ray start`), or a Ray
    # address: every worker is started by a Ray actor on a node of that cluster
    # (orchestrator/ray_launcher.py); None: local processes.
    cluster: str | None = None
    # Large arrays through shared memory on ipc links (pystream_zmq.shm); each sending
    # process's pool holds this many MiB at most (sparse: only what is in flight is memory).
    shm: bool = True
    shm_pool_mb: float = DEFAULT_POOL_MB

    @property
    def uses_shm(self) -> bool:
        """Whether this run has shared-memory pools: asked for, ipc links on this machine
        (not a cluster's nodes), and Linux."""
        return self.shm and self.endpoint is None and self.cluster is None and layout.AVAILABLE

    def credit_window(self, workers: int) -> tuple[int, int]:
        """(floor, cap) of the items in flight (ingress.Credits): ``hwm`` per link (a chain
        of N workers has N + 1) up to ``max_in_flight``; one per worker under "latest", so
        that no item waits where no worker could see it to skip it."""
        if self.drop_policy == transport.LATEST:
            return workers, workers
        return min(self.hwm * (workers + 1), self.max_in_flight), self.max_in_flight

    def __post_init__(self) -> None:
        """Refuse what cannot work before anything starts."""
        if self.hwm < 1:
            raise ValueError("hwm must be at least 1")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        level = logging.getLevelName(self.worker_log_level)  # a number for a name
        if isinstance(self.worker_log_level, str):
            if not isinstance(level, int):
                raise ValueError(f"worker_log_level: no logging level {self.worker_log_level!r}")
            self.worker_log_level = level
        if self.max_message_bytes < 1:
            raise ValueError("max_message_bytes must be at least 1")
        if self.drop_policy not in transport.DROP_POLICIES:
            raise ValueError(
                f"drop_policy must be one of {transport.DROP_POLICIES}, not {self.drop_policy!r}"
            )
        if self.max_age is not None and not self.max_age > 0:
            raise ValueError(f"max_age must be a positive number of seconds, not {self.max_age!r}")
        links.check(self.endpoint, curve=self.curve, insecure=self.insecure)
        threads.check(self.native_threads)
        if self.cluster is not None and (not isinstance(self.cluster, str) or not self.cluster):
            raise ValueError(f"cluster must be 'ray' or a Ray address, not {self.cluster!r}")
        if self.cluster is not None and self.pin_cpus:
            raise ValueError("pin_cpus=True pins CPUs of this machine: not with cluster=")
        if not (isinstance(self.shm_pool_mb, (int, float)) and self.shm_pool_mb > 0):
            raise ValueError(f"shm_pool_mb must be a positive number, not {self.shm_pool_mb!r}")
        if self.pin_cpus and not hasattr(os, "sched_setaffinity"):
            raise ValueError("pin_cpus=True needs CPU affinity (os.sched_setaffinity: Linux)")
