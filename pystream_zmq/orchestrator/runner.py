"""The orchestrator of a parallel pipeline, composed of pieces named for their jobs:

- ``launcher``: starts one worker process per ``plan.processes`` entry, restarts and stops
  them, and owns where they meet (``links``: ipc files in a private folder, or tcp);
- ``control``: the control channel, to ask every worker for its state, counters or stop;
- ``ingress``: how ``forward()`` enters the first stage, per drop policy;
- ``drain``: the end-of-stream marker that delivers everything in flight;
- ``collector``: the thread at the end of the chain (outputs, ledger, profile records);
- ``supervisor``: the thread that restarts a worker that died;
- ``stalls``: what the workers' watchdogs report about stage calls that run long, read by
  the collector from the "status" link: a worker stuck in one is passed by, then killed;
- ``copyback``: the stages' state brought back from the workers.

Profile records go, over ipc, to a writer process of their own (ProfileProcess), so that
storing them takes no CPU time from this process; over tcp, to the collector.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import zmq

from pystream_zmq import cpus
from pystream_zmq.errors import PipelineStateError
from pystream_zmq.orchestrator import ingress, observe
from pystream_zmq.orchestrator.collector import Collector
from pystream_zmq.orchestrator.control import Control, decode_counters
from pystream_zmq.orchestrator.copyback import CopyBack
from pystream_zmq.orchestrator.deadline import Deadline
from pystream_zmq.orchestrator.drain import Drain
from pystream_zmq.orchestrator.launcher import BaseLauncher, Launcher
from pystream_zmq.orchestrator.settings import ParallelSettings
from pystream_zmq.orchestrator.stalls import StallBoard
from pystream_zmq.orchestrator.supervisor import RELINKED, Supervisor
from pystream_zmq.orchestrator.worker_logs import WorkerLogs
from pystream_zmq.plan import Plan
from pystream_zmq.profiling.store import ProfileRun, Recorder, RunRecorder
from pystream_zmq.profiling.writer_handle import ProfileProcess
from pystream_zmq.shm import pools
from pystream_zmq.stage import MAIN_PIPELINE_NAME
from pystream_zmq.stats import PipelineStats
from pystream_zmq.wire import codec, security, status, transport

__all__ = ["ParallelRunner", "ParallelSettings"]

log = logging.getLogger(__name__)

_STATS_TIMEOUT = 1.0  # how long stats() waits for the workers' counters
_EXIT_GRACE = 1.0  # at close, at least this long for workers that said BYE to exit


class ParallelRunner:
    """Runs ``plan`` in worker processes until ``close()``; see the module docstring."""

    launcher: BaseLauncher[Any]

    def __init__(self, plan: Plan, settings: ParallelSettings, profile: ProfileRun | None) -> None:
        if not plan.units:
            raise PipelineStateError("a parallel pipeline needs at least one stage")
        self.plan = plan
        self.settings = settings
        self._profile = profile
        # Over tcp, profile records come to the collector, and a writer thread stores them.
        self._recorder: RunRecorder | None = None
        self._closed = False
        self.worker_counters: dict[str, dict[str, int]] = {}  # {path: {name: value}} from BYE
        self._events_sent = 0  # profile events the workers reported sending (collect_state)
        count = len(plan.processes)
        cpu, worker_cpus = cpus.plan(count) if settings.pin_cpus else (None, [None] * count)
        with contextlib.ExitStack() as undo:  # what to undo if the start fails
            self.launcher = _launcher(plan, settings, profile is not None, worker_cpus)
            undo.callback(self.launcher.close)
            self._open_channels(undo, cpu)
            undo.callback(self._stop_workers, settings.stop_timeout)
            self.launcher.start(self.control)
            if self._profile_proc is not None:  # started with the channels: it has had the time
                self._profile_proc.wait_ready(settings.startup_timeout)
            self._start_flow(undo)
            undo.pop_all()

    # -- start-up ------------------------------------------------------------------------
    def _open_channels(self, undo: contextlib.ExitStack, cpu: int | None) -> None:
        """The context, the control channel, the profile writer process and the collector:
        everything bound before the workers start."""
        self._ctx: zmq.Context[Any] = zmq.Context()
        undo.callback(self._ctx.destroy, linger=0)
        if cpu is not None:
            self._ctx.set(zmq.THREAD_AFFINITY_CPU_ADD, cpu)  # before its I/O thread
        links = self.launcher.links
        self.shared: pools.Shared | None = None  # this process's shared-memory pools
        if self.launcher.shm_fds:
            self.shared = pools.Shared(
                self.launcher.shm_fds,
                # "latest" at the source keeps an item back, and may let it go unsent.
                sends=None if self.settings.drop_policy == transport.LATEST else pools.SOURCE,
            )
        # The control channel's allow-list: the data links' too, when they are under CURVE.
        self._auth = security.start_authenticator(self._ctx, links.control_curve)
        undo.callback(security.stop_authenticator, self._auth)
        self.stalls = StallBoard(self.launcher.names, self.launcher.pid_of, self._past_limit)
        self.worker_logs = WorkerLogs(self.launcher.names, self.launcher.pid_of)
        self.control = Control(self._ctx, self.launcher.names, self._answering)
        links.bind_control(self.control.socket)
        self._copy_back = CopyBack(
            self.plan, self.control, self.stalls, self._answering, self.launcher.alive
        )
        self._profile_proc = self._start_profile_process()
        if self._profile_proc is not None:
            undo.callback(self._profile_proc.kill)
        elif self._profile is not None:
            self._recorder = self._profile.open_recorder()
            undo.callback(self._recorder.close, 1.0)
        self._sink_recorder: Recorder | None = self._profile_proc or self._recorder
        self.collector = self._open_sink(cpu)
        undo.callback(self.collector.stop)

    def _start_flow(self, undo: contextlib.ExitStack) -> None:
        """Once the workers are ready: the first stage's sockets, the ingress, the drain, and
        the collector and supervisor threads."""
        links = self.launcher.links
        self.supervisor = Supervisor(
            self.launcher.procs,
            self.launcher.names,
            self._relaunch,
            self.settings.max_restarts,
            on_give_up=self._count_the_rest_lost,
            watch=[self._profile_proc.check] if self._profile_proc is not None else [],
        )
        endpoints = [links.endpoint(name) for name in self.plan.source_connects]
        first = ingress.FirstStage(self._ctx, endpoints, self.settings.hwm, links.curve)
        self._drain = Drain(first, self.collector, self.supervisor)
        floor, self.max_in_flight = self.settings.credit_window(len(self.plan.processes))
        self._ingress = ingress.for_policy(
            self.settings.drop_policy,
            first,
            timeout=self.settings.input_timeout if self.settings.block_input else 0.0,
            collector=self.collector,
            supervisor=self.supervisor,
            floor=floor,
            cap=self.max_in_flight,
        )
        undo.callback(self._ingress.close)
        self.launcher.on_moved = self._relink
        self.collector.start()  # it records main_counters(), which reads the ingress
        self.supervisor.start()
        undo.callback(self.supervisor.stop)

    def _start_profile_process(self) -> ProfileProcess | None:
        """Over ipc, with profiling: the writer process, started now to overlap the workers'
        start-up (its readiness is checked once they are ready). The supervisor restarts it
        as it does a worker."""
        if self._profile is None or self.launcher.links.host is not None:
            return None
        links = self.launcher.links
        return ProfileProcess(
            self._ctx, self._profile.db_path, self._profile.run_id,
            links.endpoint("profile"), links.endpoint("profile-reply"),
            senders=len(self.plan.processes) + 1, max_restarts=self.settings.max_restarts,
        )  # fmt: skip

    def _open_sink(self, cpu: int | None) -> Collector:
        """The orchestrator's end of the chain and, over tcp, of the profile link, bound."""
        links = self.launcher.links
        profile = self._recorder is not None
        collector = Collector(
            self._ctx,
            [links.endpoint(name) for name in self.plan.sink_binds],
            links.endpoint("profile") if profile else None,
            self.settings.hwm,
            self._sink_recorder,
            self.main_counters,
            ordered=self.plan.sink_ordered,
            in_order=self.plan.in_order,
            curve=links.curve,
            cpu=cpu,
            sent_below=self._sent_below,
            max_message_bytes=self.settings.max_message_bytes,
            status_link=(links.endpoint("status"), self._on_status),
            shared=self.shared.views if self.shared is not None else None,
        )
        assert collector.status_endpoint is not None
        links.record("status", collector.status_endpoint)
        for name, bound in zip(self.plan.sink_binds, collector.sink_endpoints, strict=True):
            links.record(name, bound)
        if collector.profile_endpoint is not None:
            links.record("profile", collector.profile_endpoint)
        return collector

    def _sent_below(self) -> int:
        """For the collector's ledger: no item at or above this sequence number was sent.
        The lock is read first: while it is held a send may be under way with next_seq;
        once it is free, whatever was sent before has been counted in next_seq."""
        first = self._ingress.first
        sending = first.lock.locked()
        return first.next_seq + int(sending)

    def _count_the_rest_lost(self) -> None:
        """Called by the supervisor once the pipeline cannot go on: what is still in
        flight will never come out (a send under way ends within a slice, on failed)."""
        first = self._ingress.first
        with first.lock:
            forwarded = first.next_seq
        self.collector.settle(forwarded)

    def _relaunch(self, index: int) -> None:
        """Called by the supervisor: the same stage, from its original definition."""
        self.stalls.forget(index)
        self.launcher.relaunch(index)
        self._drain.resend()  # a drain's marker may have died with the old worker
        if self._sink_recorder is not None:
            self._sink_recorder.counters(self.supervisor.restart_counters([index]))

    def _relink(self, moved: dict[str, str]) -> None:
        """Called by the launcher as it restarts a worker on another cluster node: each
        ``{link name: new endpoint}`` it now binds. The source connects there; a worker
        that sends to it is restarted at once, in this thread (it connects where the links
        now are), and loses what it held, which the ledger counts as for any restart. Not
        left to the supervisor's next round: the ingress may be blocked on that worker, with
        the lock that the relaunch's drain.resend() needs."""
        for name, endpoint in moved.items():
            for process in self.plan.processes:
                if name in process.connects:
                    log.warning(
                        "worker %s restarted: it sends to %s, which moved to %s",
                        process.name, name, endpoint,
                    )  # fmt: skip
                    self.launcher.kill(process.index)
                    self.supervisor.count_restart(process.index, RELINKED)
                    self.stalls.forget(process.index)
                    self.launcher.relaunch(process.index)
            if name in self.plan.source_connects:
                self._ingress.first.relink(self.plan.source_connects.index(name), endpoint)

    # -- stalls --------------------------------------------------------------------------
    def _answering(self) -> list[int]:
        """The workers the control channel asks: alive, and not stuck in a stage call."""
        return self.launcher.alive(but=self.stalls.stuck())

    def _on_status(self, message: list[bytes]) -> None:
        """A message on the status link (in the collector's thread)."""
        if message[:1] == [status.LOG]:
            self.worker_logs.take(message)
        else:
            self.stalls.take(message)

    def _past_limit(self, index: int, pid: int, cause: str, reason: str) -> None:
        """A worker passed its deadline or its memory limit (the collector's thread):
        restart it; what it held never comes out, and the ledger counts it lost. While
        closing, a worker past its memory limit answers STOP as usual (worker/loop.py)."""
        if self._closed:
            return
        self.supervisor.expect_exit(index, pid, cause, reason)
        self.launcher.kill(index, pid)

    # -- data ----------------------------------------------------------------------------
    @property
    def forwarded(self) -> int:
        """Items that entered the first stage."""
        return self._ingress.first.next_seq

    @property
    def refused(self) -> int:
        return self._ingress.refused

    @property
    def replaced(self) -> int:
        return self._ingress.replaced

    def _raise_if_failed(self) -> None:
        if self.supervisor.failed is not None:
            raise self.supervisor.failed
        failure = self.collector.take_failure()
        if failure is not None:
            raise failure

    def forward(self, data: Any) -> bool:
        self._raise_if_failed()
        sent_at = time.time()
        placer = self.shared.allocator if self.shared is not None else None
        limit = self.settings.max_message_bytes
        if placer is None:
            frames = codec.encode(data, max_message_bytes=limit)
        else:
            frames, placed = codec.encode_shared(data, placer, max_message_bytes=limit)
        sent = False
        try:
            sent = self._ingress.send(frames, sent_at)
        finally:
            if placer is not None and not sent:  # refused or raised: nobody will read it
                placer.cancel(placed)
        if sent:
            return True
        self._raise_if_failed()
        return False

    def get_results(self) -> Any:
        self._raise_if_failed()
        timeout = self.settings.output_timeout if self.settings.block_output else 0.0
        return self.collector.take_latest(timeout)

    def subscribe(self) -> int:
        """Keep every output from now on (results()); how many came out before."""
        self.collector.every.subscribe()
        return self.collector.delivered

    def take_output(self, timeout: float) -> list[Any]:
        """The next outputs kept since subscribe(), waiting up to ``timeout``."""
        self._raise_if_failed()
        return self.collector.every.take(timeout)

    def drain(self, timeout: float) -> bool:
        """Deliver everything forwarded so far (see drain.py)."""
        deadline = Deadline(timeout)
        drained = self._ingress.wait_sent(deadline) and self._drain.run(deadline)
        if not drained:
            for line in self.stalls.lines():  # what the drain waited for, if it is known
                log.warning("the drain did not finish: %s", line)
        return drained

    # -- control -------------------------------------------------------------------------
    def collect_state(self, command: bytes = transport.GET_STATE) -> dict[str, dict[str, Any]]:
        """The stages' attributes that changed in their workers ({path: {name: value}}),
        after ``command`` (see copyback.py)."""
        states, sent = self._copy_back.collect(command, self.settings.stop_timeout)
        self._events_sent = sent  # by the workers now running; the flush waits for them
        return states

    def stats(self) -> PipelineStats:
        """What the pipeline has done so far (see ``Pipeline.stats``)."""
        stages = dict(self.worker_counters)
        if not self._closed:
            for reply in self.control.ask_all(transport.GET_COUNTERS, _STATS_TIMEOUT).values():
                stages.update(decode_counters(reply, transport.COUNTERS) or {})
        workers = observe.worker_stats(self.launcher, self.supervisor, stages, closed=self._closed)
        counters = self.main_counters()
        with self.collector.locked():
            ledger = self.collector.ledger
            lost_ranges, out = tuple(ledger.lost_ranges), ledger.next_seq
        return observe.pipeline_stats(
            counters, workers, stages, self.launcher,
            lost_ranges=lost_ranges, out=out, max_in_flight=self.max_in_flight,
            source=self.source_counters(),
        )  # fmt: skip

    def main_counters(self) -> dict[str, int]:
        """The orchestrator's counters, recorded under MainPipeline."""
        counters = {
            "forwarded": self.forwarded,
            "refused": self.refused,
            "replaced": self.replaced,
            **self.collector.counters(),
            "rogue_control": self.control.rogue,
            **self.source_counters(),
        }
        if self._sink_recorder is not None:
            counters["dropped_events"] = self._sink_recorder.dropped_events
        return counters

    def source_counters(self) -> dict[str, int]:
        """How forward() sent: small items in batches, large arrays by shared memory and
        by frame (those without shared memory: none)."""
        placer = self.shared.allocator if self.shared is not None else None
        return {
            **self._ingress.first.batch.counters,
            **(placer.counters if placer is not None else {}),
        }

    def flush_profile(self, timeout: float = 5.0) -> None:
        """Wait until the profile records sent so far are stored: the collector's, and the
        workers' as of the last collect_state() (the writer process's)."""
        if self._profile is None:
            return
        deadline = Deadline(timeout)
        self.collector.flush_events(deadline.left())
        if self._recorder is not None:
            self._recorder.writer.flush(deadline.left())
        elif self._profile_proc is not None and (
            self._profile_proc.flush(deadline.left(), self._events_sent) is None
            and not self._profile_proc.failed  # then it said so once, when it gave up
        ):
            log.warning("the profile writer did not flush in %.1f s", timeout)

    # -- shutdown ------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every worker within ``stop_timeout``: STOP, wait for BYE and their last
        profile events, close their stdin (the acknowledgement that lets them exit), then
        terminate and kill whatever is left. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._ingress.close()
        self.supervisor.stop()
        deadline = Deadline(self.settings.stop_timeout)
        self._kill_stuck()
        said_bye = self._stop_workers(deadline.left())
        # Every worker that said BYE sent its profile END before it.
        if self._profile_proc is not None:
            self._profile_proc.wait_for_ends(said_bye, deadline.left())
        elif self._recorder is not None:
            self.collector.wait_for_profile_ends(said_bye, deadline.left())
        self.launcher.close(max(deadline.left(), _EXIT_GRACE))
        self.collector.stop()
        if self._sink_recorder is not None:
            self._sink_recorder.counters(
                {MAIN_PIPELINE_NAME: self.main_counters(), **self.worker_counters}
            )
            self._sink_recorder.counters(self.supervisor.restart_counters())
        if self._profile_proc is not None:
            self._profile_proc.close(max(deadline.left(), 1.0), self._events_sent)
        if self._recorder is not None:
            self._recorder.close(max(deadline.left(), 1.0))
        security.stop_authenticator(self._auth)
        self._ctx.destroy(linger=0)

    def _kill_stuck(self) -> None:
        """The workers stuck in a stage call, or that did not answer CLEANUP, could not
        answer STOP either: kill them, so that the others are stopped as usual."""
        stuck = self.stalls.stuck() | self._copy_back.unanswered_cleanup
        for index in sorted(set(self.launcher.alive()) & stuck):
            what = self.stalls.line(index) or f"{self.launcher.names[index]} did not answer"
            log.warning("stopping the pipeline: %s; that worker is killed", what)
            self.launcher.kill(index)

    def _stop_workers(self, timeout: float) -> int:
        """Tell every live worker to STOP and keep the counters of its BYE; how many said
        BYE (each sent its last profile records first)."""
        replies = self.control.ask_all(transport.STOP, timeout)
        for reply in replies.values():
            self.worker_counters.update(decode_counters(reply, transport.BYE) or {})
        return len(replies)


def _launcher(
    plan: Plan, settings: ParallelSettings, profile: bool, worker_cpus: Sequence[int | None]
) -> BaseLauncher[Any]:
    """Local worker processes, or (``cluster=``) Ray actors' (imported only then)."""
    if settings.cluster is None:
        return Launcher(plan, settings, profile=profile, worker_cpus=worker_cpus)
    from pystream_zmq.orchestrator.ray_launcher import RayLauncher

    return RayLauncher(plan, settings, profile=profile)
