"""What ``Pipeline.parallelize()`` sets for its orchestrator, in one dataclass that the
runner and the launcher both read."""

from __future__ import annotations

from dataclasses import dataclass

from pystream_zmq.wire import transport


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
