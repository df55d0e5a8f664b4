"""``Pipeline``: PyStream's API over serial (inline) and parallel (one process per stage)
runners."""

from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

from pystream_zmq.errors import PipelineStateError, PyStreamError, StageNameError
from pystream_zmq.orchestrator.runner import ParallelRunner, ParallelSettings
from pystream_zmq.orchestrator.settings import DEFAULT_MAX_IN_FLIGHT
from pystream_zmq.pacing import InputLoop
from pystream_zmq.plan import Entry, Limits, Plan, layout, leaves, plan_of, raising_paths
from pystream_zmq.profiling import report, store, summary
from pystream_zmq.serial import SerialRunner
from pystream_zmq.stage import (
    MAIN_PIPELINE_NAME,
    ON_ERROR_POLICIES,
    Stage,
    StageChain,
    check_stage_name,
)
from pystream_zmq.stats import PipelineStats
from pystream_zmq.wire import codec, transport

log = logging.getLogger(__name__)

_GENERATE: Any = object()  # forward()'s default: take the item from input_generator


class Pipeline:
    """A chain of stages, run serially (``serialize()``) or one process per stage
    (``parallelize()``). A drop-in replacement for ``pystream.Pipeline``."""

    def __init__(
        self,
        input_generator: Callable[[], Any] | None = None,
        use_profiler: bool = False,
        *,
        on_error: str = "drop",
    ) -> None:
        """``on_error``: what a stage raising does. ``"drop"`` (the default) drops the item,
        logs the error and counts it; ``"raise"`` also makes the next ``forward()`` or
        ``get_results()`` raise ``StageError``. ``add(..., on_error=...)`` sets it per stage;
        a child pipeline's stages follow the top pipeline's setting unless set per stage."""
        self.input_generator = input_generator
        self.use_profiler = use_profiler
        self.on_error = _check_policy(on_error)
        self._entries: list[Entry] = []
        self._unnamed = 0
        self._mode: str | None = None
        self._runner: SerialRunner | ParallelRunner | None = None
        self._loop: InputLoop | None = None
        self._drain_timeout = 10.0
        self._profile_run: store.ProfileRun | None = None
        self._at_exit: Callable[[], None] | None = None

    # -- building ------------------------------------------------------------------------
    def add(
        self,
        stage: Callable[[Any], Any],
        name: str | None = None,
        *,
        on_error: str | None = None,
        drop_policy: str | None = None,
        replicas: int = 1,
        ordered: bool = True,
        stall_after: float | None = None,
        deadline: float | None = None,
        max_attribute_bytes: int | None = None,
    ) -> None:
        """Append a stage: a ``Stage`` instance, a one-argument function, or another
        pipeline's ``as_stage()``. Without ``name``, a Stage's ``name`` attribute is used,
        else ``Stage_N``. ``on_error`` overrides the pipeline's for this stage;
        ``drop_policy`` (``"block"`` or ``"latest"``) the ``parallelize()`` one for the link
        into this stage's worker.

        ``replicas``: under ``parallelize()``, this many worker processes share the stage's
        input, each with its own copy of the stage. With ``ordered`` (the default) their
        outputs are put back in input order in front of the next stage; ``ordered=False``
        passes them on as they come.

        Under ``parallelize()``, per call of the stage (of each of a child's stages): after
        ``stall_after`` seconds on one item (default 10) a WARNING names it, repeated while
        it runs; past ``deadline`` seconds (default none) its worker is restarted and the
        item counted lost. An attribute over ``max_attribute_bytes`` (default 64 MiB) is not
        copied back. None: as the enclosing pipeline's entry; ``math.inf``: no limit."""
        if self._runner is not None:
            raise PipelineStateError("stages cannot be added while running; cleanup() first")
        if not callable(stage):
            raise TypeError(f"a stage must be callable, not {type(stage).__name__}")
        if name is None and isinstance(stage, Stage):
            name = getattr(stage, "name", None)
        taken = {entry.name for entry in self._entries}
        if name is None:
            while name is None or name in taken:
                self._unnamed += 1
                name = f"Stage_{self._unnamed}"
        check_stage_name(name)
        if name in taken:
            raise StageNameError(f"a stage named {name!r} is already in this pipeline")
        if on_error is not None:
            _check_policy(on_error)
        if drop_policy is not None:
            _check_drop_policy(drop_policy, transport.LINK_POLICIES)
        if type(replicas) is not int or replicas < 1:
            raise ValueError(f"replicas must be a whole number of at least 1, not {replicas!r}")
        limits = Limits(stall_after, deadline, max_attribute_bytes)  # checks them
        child = stage.pipeline if isinstance(stage, PipelineStage) else None
        self._entries.append(
            Entry(name, stage, child, on_error, drop_policy, replicas, ordered, limits)
        )

    @property
    def entries(self) -> tuple[Entry, ...]:
        """The stages added so far, in order (see ``pystream_zmq.plan.Entry``)."""
        return tuple(self._entries)

    @property
    def mode(self) -> str | None:
        """ "serial" or "parallel" while running (or while a parent runs its stages), else
        None."""
        return self._mode

    def as_stage(self) -> PipelineStage:
        """This pipeline as one stage of another. Serialized, it runs as one worker that
        executes its stages inline; parallelized, its stages join the parent's workers."""
        return PipelineStage(self)

    def plan(self, *, drop_policy: str = transport.BLOCK, root: str = MAIN_PIPELINE_NAME) -> Plan:
        """What ``parallelize(drop_policy=...)`` would run, as data: its units, processes
        and links (see ``pystream_zmq.plan``). Nothing starts. ``root`` is the top level of
        the profile paths. A parallelized child pipeline's stages join this plan as units of
        their own; a serialized one is one unit."""
        _check_drop_policy(drop_policy, transport.DROP_POLICIES)
        return plan_of(self, drop_policy=drop_policy, root=root)

    # -- starting ------------------------------------------------------------------------
    def serialize(self) -> Pipeline:
        """Run every stage inline, in the caller's thread."""
        self._start("serial", None)
        return self

    def parallelize(
        self,
        block_input: bool = True,
        input_timeout: float = 10,
        block_output: bool = False,
        output_timeout: float = 10,
        *,
        hwm: int = transport.DEFAULT_HWM,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES,
        worker_log_level: int | str = "WARNING",
        startup_timeout: float = 30.0,
        drain_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        max_restarts: int = 3,
        drop_policy: str = transport.BLOCK,
        max_age: float | None = None,
        endpoint: str | None = None,
        curve: bool = False,
        insecure: bool = False,
        pin_cpus: bool = False,
        native_threads: int | str | None = "auto",
    ) -> Pipeline:
        """Run every stage (or serial sub-pipeline) in its own process; returns once all
        workers are ready. ``hwm`` bounds each link's queue (backpressure), and with it the
        items in flight (forwarded, not yet out: delivered, dropped or counted lost): ``hwm``
        per link, ``hwm * (workers + 1)`` in all, more only while items come out so fast that
        10 ms of the pipeline's work would be more (small items through quick stages), and
        never more than ``max_in_flight``. A ``forward()`` past it waits like one into a
        full queue. An item whose encoding is
        over ``max_message_bytes``, or holds a container of over 1,000,000 items, is refused
        where it is made: ``forward()`` raises ``ItemTooLargeError``, and a stage output is
        that stage's error (logged, counted dropped). The workers' log records at or above
        ``worker_log_level`` come out of this process's logging, under the logger
        ``pystream_zmq.stages.<stage path with dots>``; repeats are summarised. A worker that
        dies is restarted (with backoff) up to ``max_restarts`` times; after that
        ``forward()`` and ``get_results()`` raise ``WorkerCrashedError``.

        ``drop_policy``: what happens when a stage cannot keep up. ``"block"`` (default)
        waits: lossless. ``"latest"``: ``forward()`` never waits, and on every link a newer
        item replaces the one waiting, which is dropped and counted (``replaced``).
        ``"drop-newest"``: ``forward()`` refuses an item at once when the first stage is
        full (``refused``); the links between workers block. ``max_age`` (seconds): an
        item older than that (since ``forward()``) when it reaches a worker is dropped and
        counted (``expired``).

        ``endpoint="tcp://HOST"``: link the processes over tcp on that address of this
        machine, on ports the OS chooses, instead of ipc files. ``curve=True``: encrypt and
        authenticate every link with CURVE, under a key pair made for this run. A HOST other
        machines can reach (not 127.0.0.0/8, ::1 or localhost) is refused with
        ``SecurityError`` (a ``ValueError``) unless ``curve`` or ``insecure`` is given.

        ``pin_cpus=True``: keep each worker process on one CPU, and this process's ZeroMQ
        and collector threads on another, round-robin over the CPUs this process may use
        (your own threads stay free). Worth it when the pipeline is the machine's main load
        and there are about as many CPUs as workers; otherwise leave it off.

        ``native_threads``: the size of each worker's native thread pools (OpenCV, OpenBLAS,
        MKL, OpenMP), which otherwise each start as many threads as the machine has CPUs in
        every worker. ``"auto"`` (default): a fair share, ``max(1, usable CPUs // worker
        processes)``, 1 under ``pin_cpus``; a number: that many; ``None`` or 0: leave them
        as the libraries and the environment make them. Your own process is never touched."""
        settings = ParallelSettings(  # checks them all
            block_input=block_input,
            input_timeout=input_timeout,
            block_output=block_output,
            output_timeout=output_timeout,
            hwm=hwm,
            max_in_flight=max_in_flight,
            max_message_bytes=max_message_bytes,
            worker_log_level=worker_log_level,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
            max_restarts=max_restarts,
            drop_policy=drop_policy,
            max_age=max_age,
            endpoint=endpoint,
            curve=curve,
            insecure=insecure,
            pin_cpus=pin_cpus,
            native_threads=native_threads,
        )
        self._drain_timeout = drain_timeout
        self._start("parallel", settings)
        return self

    def _start(self, mode: str, settings: ParallelSettings | None) -> None:
        if self._runner is not None:
            raise PipelineStateError(
                f"the pipeline is already running ({self._mode}); call cleanup() first"
            )
        for child in self._children():
            child._release()  # its stages now run under this pipeline
        self._mode = mode
        record = self._start_profile_run(mode)
        try:
            if settings is None:
                raising = raising_paths(self, MAIN_PIPELINE_NAME, self.on_error)
                self._runner = SerialRunner(leaves(self, MAIN_PIPELINE_NAME), record, raising)
            else:
                self._runner = ParallelRunner(
                    self.plan(drop_policy=settings.drop_policy), settings, record
                )
                # After the runner: its own exit hook (weakref.finalize's, which stops the
                # workers) must run after this one, and atexit runs the last one first.
                self._stop_at_exit()
        except BaseException:
            self._profile_run = None
            raise

    # -- running -------------------------------------------------------------------------
    def forward(self, data: Any = _GENERATE) -> bool:
        """Push one item (by default, the input generator's). False when a parallel
        pipeline could not take it within ``input_timeout`` (or at once, non-blocking)."""
        runner = self._running()
        if data is _GENERATE:
            data = self._generate()
        return runner.forward(data)

    def get_results(self) -> Any:
        """The latest output, never the same one twice; None when there is nothing new."""
        return self._running().get_results()

    def stats(self) -> PipelineStats:
        """What the running pipeline has done: items forwarded, delivered, dropped and lost
        (by sequence number), each worker's pid and restarts, each stage's counters, and
        where its links are bound. Asks the workers for their counters (waiting up to 1 s)."""
        return self._running().stats()

    def start_loop(self, period: float = 0.01) -> None:
        """Forward the input generator's data every ``period`` seconds, in a thread."""
        self._running()
        if self.input_generator is None:
            raise PipelineStateError("start_loop() needs an input_generator")
        if self._loop is not None:
            raise PipelineStateError("the loop is already running")
        self._loop = InputLoop(self.forward, period)
        self._loop.start()

    def stop_loop(self) -> None:
        """Stop the input loop (if any), deliver what is in flight, and bring the stages'
        state (their attributes) back from the workers."""
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.stop()
        if isinstance(self._runner, ParallelRunner):
            self._drain(self._runner)
            self._apply_state(self._runner.collect_state())
        if loop is not None and loop.error is not None:
            raise PyStreamError(f"the input loop stopped early: {loop.error!r}") from loop.error

    def _drain(self, runner: ParallelRunner) -> None:
        if not runner.drain(self._drain_timeout):
            log.warning(
                "not every item in flight came out (waited up to %g s)", self._drain_timeout
            )

    # -- stopping ------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Stop the loop and every worker, run every stage's cleanup(); idempotent."""
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.stop()
        runner, self._runner = self._runner, None
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
            self._at_exit = None
        if isinstance(runner, ParallelRunner):
            try:
                self._drain(runner)
                self._apply_state(runner.collect_state(transport.CLEANUP))
            finally:
                runner.close()
        elif runner is not None:
            runner.close()

    def _stop_at_exit(self) -> None:
        """If the program ends without cleanup(), deliver what is in flight (within
        drain_timeout) and stop the workers then, with one warning. Not in a forked child:
        the pipeline is its parent's."""
        me, pid = weakref.ref(self), os.getpid()

        def stop() -> None:
            pipeline = me()
            if pipeline is not None and pipeline._runner is not None and os.getpid() == pid:
                log.warning(
                    "a parallel pipeline was still running at exit: delivering what is in "
                    "flight and stopping it (call cleanup(), or use `with Pipeline(...)`)"
                )
                pipeline.cleanup()

        self._at_exit = stop
        atexit.register(stop)

    def _release(self) -> None:
        """Stop this pipeline's own runner without running stage cleanups: its stages are
        about to run inside a parent pipeline."""
        runner, self._runner = self._runner, None
        if isinstance(runner, ParallelRunner):
            runner.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # -- profiles ------------------------------------------------------------------------
    def get_profiles(self) -> tuple[dict[str, float], dict[str, float]]:
        """(latency in s, throughput in items/s) per stage path, as PyStream defines them."""
        if self._profile_run is None:
            return {}, {}
        self._flush_profile()
        return summary.read_profiles(self._profile_run.db_path, self._profile_run.run_id)

    def get_profile_report(self) -> report.ProfileReport | None:
        """Per stage path: item count, latency mean/p50/p95/p99, queue wait versus compute,
        throughput, drops and errors (see ``pystream_zmq.report``). None without profiling.
        While running, counters may be up to a second old; after cleanup() they are final.
        ``complete`` is False when records are missing (``missing``, ``warning()``)."""
        if self._profile_run is None:
            return None
        self._flush_profile()
        return report.build_report(self._profile_run.db_path, self._profile_run.run_id)

    def _flush_profile(self) -> None:
        if self._runner is not None:
            self._runner.flush_profile()

    def _start_profile_run(self, mode: str) -> store.ProfileRun | None:
        """Register the run; the runner stores its records."""
        if not self.use_profiler:
            self._profile_run = None
            return None
        db_path = store.profiler_db_path()
        paths = [(MAIN_PIPELINE_NAME, "pipeline")]
        paths += [(path, kind) for path, kind, _ in layout(self, MAIN_PIPELINE_NAME)]
        run_id = store.start_run(db_path, MAIN_PIPELINE_NAME, mode, paths)
        self._profile_run = store.ProfileRun(db_path, run_id)
        return self._profile_run

    # -- structure -----------------------------------------------------------------------
    def _children(self) -> list[Pipeline]:
        return [e.stage.pipeline for e in self._entries if isinstance(e.stage, PipelineStage)]

    def _apply_state(self, states: dict[str, dict[str, Any]]) -> None:
        """Copy attributes sent back by workers onto the user's own stage objects."""
        stages = {path: stage for path, _, stage in layout(self, MAIN_PIPELINE_NAME)}
        for path, attributes in states.items():
            stage = stages.get(path)
            for key, value in attributes.items() if stage is not None else ():
                try:
                    setattr(stage, key, value)
                except Exception as e:
                    log.debug("could not set %s.%s: %r", path, key, e)

    def _running(self) -> SerialRunner | ParallelRunner:
        if self._runner is None:
            raise PipelineStateError(
                "the pipeline is not running: call serialize() or parallelize() first"
            )
        return self._runner

    def _generate(self) -> Any:
        if self.input_generator is None:
            raise PipelineStateError("forward() without data needs an input_generator")
        return self.input_generator()


def _check_policy(on_error: str) -> str:
    if on_error not in ON_ERROR_POLICIES:
        raise ValueError(f"on_error must be one of {ON_ERROR_POLICIES}, not {on_error!r}")
    return on_error


def _check_drop_policy(policy: str, allowed: tuple[str, ...]) -> str:
    if policy not in allowed:
        raise ValueError(f"drop_policy must be one of {allowed}, not {policy!r}")
    return policy


class PipelineStage(Stage):
    """A pipeline used as a stage of another pipeline (see ``Pipeline.as_stage``)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def __call__(self, data: Any) -> Any:
        ok, out = StageChain(leaves(self.pipeline, ""), None).run(data, 0, time.time())
        return out if ok else None

    def cleanup(self) -> None:
        StageChain(leaves(self.pipeline, ""), None).cleanup()
