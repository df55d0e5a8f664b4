"""``Pipeline``: PyStream's API over serial (inline) and parallel (one process per stage)
runners."""

from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from pystream_zmq.errors import PipelineStateError, StageNameError
from pystream_zmq.every import every_output
from pystream_zmq.orchestrator.runner import ParallelRunner, ParallelSettings
from pystream_zmq.orchestrator.settings import DEFAULT_MAX_IN_FLIGHT
from pystream_zmq.plan import (
    Entry,
    Limits,
    Placement,
    Plan,
    check_drop_policy,
    check_on_error,
    layout,
    leaves,
    plan_of,
    raising_paths,
    unit_leaves,
)
from pystream_zmq.profiling import report, runs, store, summary
from pystream_zmq.serial import SerialRunner
from pystream_zmq.shm.pools import DEFAULT_POOL_MB
from pystream_zmq.source_input import EndOfInput, Input, raise_error
from pystream_zmq.stage import (
    MAIN_PIPELINE_NAME,
    Stage,
    StageChain,
    check_stage_name,
)
from pystream_zmq.stats import PipelineStats
from pystream_zmq.wire import codec, transport

log = logging.getLogger(__name__)

_GENERATE: Any = object()  # forward()'s default: take the item from input_generator
_FOREVER = 1e9  # seconds: join(timeout=None)


class Pipeline:
    """A chain of stages, run serially (``serialize()``) or one process per stage
    (``parallelize()``). A drop-in replacement for ``pystream.Pipeline``."""

    def __init__(
        self,
        input_generator: Callable[[], Any] | Iterable[Any] | None = None,
        use_profiler: bool = False,
        *,
        on_error: str = "drop",
        run_name: str | None = None,
    ) -> None:
        """``input_generator``: a callable returning one item per call (PyStream's), or an
        iterable; its end (exhausted, or the callable's ``StopIteration``) is the end of the
        stream. ``on_error``: ``"drop"`` (the default) drops, logs and counts an item a
        stage raised on; ``"raise"`` also makes the next call raise ``StageError`` (per stage:
        ``add(..., on_error=...)``). ``run_name``: its profile runs' name (default: the
        script's). docs/api.md has each in full."""
        self._input = Input(input_generator)
        self.use_profiler = use_profiler
        self.on_error = check_on_error(on_error)
        self.run_name = None if run_name is None else runs.check_run_name(run_name)
        self._entries: list[Entry] = []
        self._unnamed = 0
        self._mode: str | None = None
        self._runner: SerialRunner | ParallelRunner | None = None
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
        max_memory_mb: float | None = None,
        resources: Mapping[str, float] | None = None,
        num_cpus: float | None = None,
    ) -> None:
        """Append a stage: a ``Stage`` instance, a one-argument function, or another
        pipeline's ``as_stage()``; named ``name``, else its ``name`` attribute, else
        ``Stage_N``. The rest, under ``parallelize()`` (docs/api.md has each in full):

        - ``on_error``, ``drop_policy``: this stage's, instead of the pipeline's;
        - ``replicas``: worker processes sharing its input, ``ordered`` (the default) or not;
        - ``stall_after`` (10 s): warn while a call runs longer; ``deadline``: restart the
          worker past it; ``max_attribute_bytes`` (64 MiB): copy back no larger attribute;
          ``max_memory_mb``: replace the worker once its resident memory is over it.
          None: as the enclosing pipeline's entry; ``math.inf``: no limit;
        - ``resources`` (``{"GPU": 1}``, ``{"camera0": 1}``), ``num_cpus`` (default 1): what
          a node must have free for this stage's workers under ``parallelize(cluster=...)``
          (docs/ray.md); checked here, and not read by a local ``parallelize()``."""
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
        limits = Limits(stall_after, deadline, max_attribute_bytes, max_memory_mb)
        placement = Placement.of(resources, num_cpus)
        child = stage.pipeline if isinstance(stage, PipelineStage) else None
        self._entries.append(  # Entry, Limits and Placement check themselves
            Entry(name, stage, child, on_error, drop_policy, replicas, ordered, limits, placement)
        )

    @property
    def input_generator(self) -> Callable[[], Any] | Iterable[Any] | None:
        return self._input.source

    @input_generator.setter
    def input_generator(self, source: Callable[[], Any] | Iterable[Any] | None) -> None:
        self._input.source = source
        self._input.restart()

    @property
    def input_ended(self) -> bool:
        """Whether the input generator's stream has ended (see ``__init__``)."""
        return self._input.ended

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
        check_drop_policy(drop_policy, transport.DROP_POLICIES)
        return plan_of(self, drop_policy=drop_policy, root=root)

    # -- starting ------------------------------------------------------------------------
    def serialize(
        self,
        *,
        check_sendable: bool = True,
        max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES,
    ) -> Pipeline:
        """Run every stage inline, in the caller's thread.

        What may pass between stages is what ``parallelize()`` could send, so that code
        tested serially runs parallelized. ``forward()`` of data that ``parallelize()``
        would refuse raises the same ``UnsupportedTypeError`` or ``ItemTooLargeError``
        (over ``max_message_bytes``, or holding a container of over 1,000,000 items),
        naming the key path; nothing is taken. A stage output that ``parallelize()`` could
        not send on (to the next stage's process, or out of the pipeline) is that stage's
        error on the item, as there: the same log line, counted (``encode_errors``), the
        item dropped, and ``StageError`` with ``on_error="raise"``. The stages of a child
        pipeline that would run in one worker pass anything among themselves, as they
        would there. ``check_sendable=False`` lets anything through: the check walks each
        item at ``forward()`` and after each stage, about 2 us each time for a small dict
        (for a dict holding an image, under 1 us)."""
        if type(max_message_bytes) is not int or max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be at least 1, not {max_message_bytes!r}")
        self._start("serial", None, max_message_bytes if check_sendable else None)
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
        cluster: str | None = None,
        shm: bool = True,
        shm_pool_mb: float = DEFAULT_POOL_MB,
    ) -> Pipeline:
        """Run every stage (or serial sub-pipeline) in its own process; returns once all
        workers are ready. The settings, in short (docs/api.md has each in full):

        - ``hwm``: items per link; in flight (forwarded, not yet out) ``hwm * (workers +
          1)``, wider for quick small items, never past ``max_in_flight``;
        - ``max_message_bytes``: an item over it is refused where it is made
          (``ItemTooLargeError`` from ``forward()``; a stage's counted, logged drop);
        - ``worker_log_level``: workers' records at or above it come out of this process's
          logging, under ``pystream_zmq.stages.<stage path with dots>``;
        - ``max_restarts``: a worker that dies is restarted up to this many times, then
          ``forward()`` and ``get_results()`` raise ``WorkerCrashedError``;
        - ``drop_policy`` (``"block"``, ``"latest"``, ``"drop-newest"``) and ``max_age``:
          what happens when a stage cannot keep up (docs/realtime.md);
        - ``endpoint="tcp://HOST"``, ``curve``, ``insecure``: tcp links, under CURVE with
          keys made for the run (docs/security.md);
        - ``pin_cpus``: a CPU per worker, for a pipeline that is the machine's main load;
        - ``native_threads``: each worker's OpenCV/BLAS/OpenMP pools, ``"auto"``: a fair
          share of the CPUs; ``None`` or 0: left alone;
        - ``cluster="ray"`` (the current ``ray.init()`` connection) or a Ray address: every
          worker runs on a node of a Ray cluster, placed by ``add(resources=, num_cpus=)``
          (docs/ray.md);
        - ``shm``: large arrays (64 KiB or more) go through shared memory on this host's
          ipc links, each sending process's pool up to ``shm_pool_mb`` MiB; when a pool is
          full they go by frame, as with ``shm=False`` (docs/shared-memory.md)."""
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
            cluster=cluster,
            shm=shm,
            shm_pool_mb=shm_pool_mb,
        )
        self._drain_timeout = drain_timeout
        self._start("parallel", settings)
        return self

    def _start(
        self, mode: str, settings: ParallelSettings | None, check_limit: int | None = None
    ) -> None:
        """``check_limit``: serial mode checks the data between stages, up to this many
        bytes encoded; None: it does not."""
        if self._runner is not None:
            raise PipelineStateError(
                f"the pipeline is already running ({self._mode}); call cleanup() first"
            )
        for child in self._children():
            child._release()  # its stages now run under this pipeline
        self._mode = mode
        self._input.restart()
        record = self._start_profile_run(mode)
        try:
            if settings is None:
                raising = raising_paths(self, MAIN_PIPELINE_NAME, self.on_error)
                units = unit_leaves(self, MAIN_PIPELINE_NAME)
                self._runner = SerialRunner(units, record, raising, check_limit)
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
        pipeline could not take it within ``input_timeout`` (or at once, non-blocking), and
        at the end of the input generator's stream (``input_ended`` is then True)."""
        runner = self._running()
        if data is _GENERATE:
            try:
                data = self._input.next()
            except EndOfInput:
                return False
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
        """Forward the input generator's data every ``period`` seconds, in a thread, until
        the end of its stream (or ``stop_loop()``)."""
        self._running()
        self._input.start_loop(self.forward, period)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the input loop has reached the end of the input stream and the last
        output is out; False if that did not happen within ``timeout`` seconds. Without an
        input loop, wait for what was forwarded to come out."""
        end = time.monotonic() + (_FOREVER if timeout is None else timeout)
        runner = self._running()
        if not self._input.wait_for_loop(end - time.monotonic()):
            return False
        if isinstance(runner, ParallelRunner):
            return runner.drain(max(0.0, end - time.monotonic()))
        return True

    def results(self) -> Iterator[Any]:
        """Every output from now on, in input order (unless replicas run ``ordered=False``),
        until the end of the input stream (when ``join()`` would return). Unlike
        ``get_results()``, nothing is skipped: a reader that falls behind holds the pipeline
        back (``forward()`` waits, as for a full queue), and items a stage dropped are
        counted, not yielded. Call it before forwarding (before ``start_loop()``): outputs
        that came out before are not in it (a warning says how many)."""
        runner = self._running()
        before = runner.subscribe()
        if before:
            log.warning(
                "results(): %d outputs came out before it was called and are not in it; "
                "call results() before forwarding",
                before,
            )
        return every_output(runner.take_output, self._input_done, lambda: self._runner is runner)

    def _input_done(self) -> bool:
        """Whether the input is over, and then (parallel) drained: what never came out is
        counted lost. Raises what made the input loop stop early."""
        if not self._input.finished():
            return False
        if isinstance(self._runner, ParallelRunner):
            self._drain(self._runner)
        return True

    def stop_loop(self) -> None:
        """Stop the input loop (if any), deliver what is in flight, and bring the stages'
        state (their attributes) back from the workers."""
        loop = self._input.stop_loop()
        if isinstance(self._runner, ParallelRunner):
            self._drain(self._runner)
            self._apply_state(self._runner.collect_state())
        raise_error(loop)

    def _drain(self, runner: ParallelRunner) -> None:
        if not runner.drain(self._drain_timeout):
            log.warning(
                "not every item in flight came out (waited up to %g s)", self._drain_timeout
            )

    # -- stopping ------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Stop the loop and every worker, run every stage's cleanup(); idempotent."""
        self._input.stop_loop()
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
        about to run inside a parent pipeline, and are profiled in the parent's run. The run
        this one registered goes too, unless items went through it."""
        runner, self._runner = self._runner, None
        if isinstance(runner, ParallelRunner):
            runner.close()
        elif runner is not None:
            runner.close(cleanup=False)
        run, self._profile_run = self._profile_run, None
        if run is not None and not runs.delete_if_empty(run.db_path, run.run_id):
            self._profile_run = run

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # -- profiles ------------------------------------------------------------------------
    @property
    def profile_run(self) -> store.ProfileRun | None:
        """The profile database and run id this pipeline records into (its last run after
        cleanup()); None without profiling. For tools that read the database as it grows
        (``pystream_zmq.profiling.report.build_report(db_path, run_id, since=...)``)."""
        return self._profile_run

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
        name = self.run_name or runs.default_run_name()
        run_id = store.start_run(db_path, name, mode, paths)
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


class PipelineStage(Stage):
    """A pipeline used as a stage of another pipeline (see ``Pipeline.as_stage``)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def __call__(self, data: Any) -> Any:
        ok, out = StageChain(leaves(self.pipeline, ""), None).run(data, 0, time.time())
        return out if ok else None

    def cleanup(self) -> None:
        StageChain(leaves(self.pipeline, ""), None).cleanup()
