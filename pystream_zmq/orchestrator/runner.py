"""The orchestrator of a parallel pipeline: starts one worker process per unit, owns the
source and sink ends of the chain, collects profile events, and shuts everything down
within a deadline.

Chain over ipc:// files in a private directory (or tcp, see links.py): each worker binds its
input, connects to the next one's, and the last one connects to the orchestrator's sink.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import cloudpickle
import zmq

from pystream_zmq import child, cpus
from pystream_zmq.errors import DecodeError, PipelineStateError, StageError, WorkerStartupError
from pystream_zmq.orchestrator import links
from pystream_zmq.orchestrator.ledger import Ledger
from pystream_zmq.orchestrator.supervisor import Supervisor
from pystream_zmq.plan import Plan
from pystream_zmq.profiling.events import unpack_events
from pystream_zmq.profiling.store import Recorder, RunRecorder
from pystream_zmq.profiling.writer_process import ProfileProcess, is_counters
from pystream_zmq.stage import MAIN_PIPELINE_NAME, EventBuffer
from pystream_zmq.stats import PipelineStats, WorkerStats
from pystream_zmq.wire import codec, security, transport
from pystream_zmq.wire.inputs import Inputs
from pystream_zmq.wire.outputs import Outputs
from pystream_zmq.worker.spec import WorkerSpec, write_spec

log = logging.getLogger(__name__)

_IDLE_FLUSH_MS = 200
_BURST = 64  # outputs read per wake-up of the collector
_MALLOC_KEEP_FREED = {"MALLOC_MMAP_THRESHOLD_": "16777216", "MALLOC_TRIM_THRESHOLD_": "134217728"}
_COUNTERS_INTERVAL = 1.0  # how often the collector records the orchestrator's counters
_STATS_TIMEOUT = 1.0  # how long stats() waits for each worker's counters
_FEED_POLL_MS = 20  # under "latest", how long the feeder waits for room before letting go


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


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def left_ms(self) -> int:
        return int(self.left() * 1000)


class ParallelRunner:
    def __init__(
        self,
        plan: Plan,
        settings: ParallelSettings,
        recorder: RunRecorder | None,
    ) -> None:
        if not plan.units:
            raise PipelineStateError("a parallel pipeline needs at least one stage")
        self.plan = plan
        self.units = list(plan.units)
        self._slots = [(p.unit, p.replica) for p in plan.processes]
        self._names = [p.name for p in plan.processes]
        self.settings = settings
        self._recorder = recorder
        host = links.check(settings.endpoint, curve=settings.curve, insecure=settings.insecure)
        self._dir = tempfile.mkdtemp(prefix="pystream-")
        self._links = links.Links(self._dir, host, settings.curve)
        self._ctx: zmq.Context[Any] = zmq.Context()
        # CPUs (pin_cpus): ours, then one per worker process.
        self._cpu: int | None = None
        self._worker_cpus: list[int | None] = [None] * len(self._slots)
        if settings.pin_cpus:
            cpu, worker_cpus = cpus.plan(len(self._slots))
            self._cpu, self._worker_cpus = cpu, list(worker_cpus)
            self._ctx.set(zmq.THREAD_AFFINITY_CPU_ADD, cpu)  # before its I/O thread
        self._auth = security.start_authenticator(self._ctx, self._links.curve)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._blobs: list[bytes] = []
        self._draining = 0  # the end-of-stream token a drain waits for, 0 when none
        # Kills workers and removes socket files even if cleanup() is never called.
        self._finalizer = weakref.finalize(self, _teardown, self._procs, self._dir)
        self._closed = False
        self._ready: set[int] = set()  # workers that said READY: the ones that answer commands
        self.worker_counters: dict[str, dict[str, int]] = {}  # {path: {name: value}} from BYE
        self.forwarded = self.refused = 0  # items forward() sent / could not send
        self.replaced = 0  # "latest": items forward() took that a newer one replaced
        # "latest": the item waiting for room at the first stage, (frames, sent_at).
        self._pending: tuple[list[bytes], float] | None = None
        self._pending_cond = threading.Condition()
        self._feeder: threading.Thread | None = None
        self._events_sent = 0  # profile events the workers reported sending (collect_state)

        self._control = transport.make_socket(self._ctx, zmq.ROUTER, 1000)
        self._control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._control.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes its id over
        first = [
            transport.make_socket(self._ctx, zmq.PUSH, settings.hwm) for _ in plan.source_connects
        ]
        self._source = Outputs(first)
        self._source_lock = threading.Lock()
        self._next_seq = 0
        self._next_eos = 0
        # Over ipc, profile records go to a writer process of their own (issue 3: storing
        # them took CPU time from this process); over tcp, to the collector as before.
        self._profile_proc: ProfileProcess | None = None
        self._sink_recorder: Recorder | None = recorder
        try:  # over tcp, the address may not be this machine's
            self._links.bind(self._control, "control")
            if recorder is not None and self._links.host is None:
                self._profile_proc = self._sink_recorder = ProfileProcess(
                    self._ctx, recorder.writer.db_path, recorder.run_id,
                    self._endpoint("profile"), self._endpoint("profile-reply"),
                )  # fmt: skip
            self._collector = self._open_sink(self._sink_recorder)
        except BaseException:
            if self._profile_proc is not None:
                self._profile_proc.kill()
            security.stop_authenticator(self._auth)
            self._ctx.destroy(linger=0)  # closes the sockets made so far
            self._finalizer()
            raise
        try:
            self._start_workers()
            if self._profile_proc is not None:  # started above; it has had the time
                self._profile_proc.wait_ready(settings.startup_timeout)
        except BaseException:
            self.close()
            raise
        for replica, sock in enumerate(self._source.sockets):
            security.connect(sock, self._input_endpoints(0, replica)[0], self._links.curve)
        self._collector.start()
        self._supervisor = Supervisor(
            self._procs, self._names, self._relaunch, settings.max_restarts
        )
        self._supervisor.start()
        if settings.drop_policy == transport.LATEST:
            self._feeder = threading.Thread(target=self._feed, name="pystream-feeder", daemon=True)
            self._feeder.start()

    # -- start-up ------------------------------------------------------------------------
    def _endpoint(self, name: str) -> str:
        return self._links.endpoint(name)

    def _open_sink(self, recorder: Recorder | None) -> Collector:
        """The orchestrator's end of the chain and of the profile link, bound."""
        collector = Collector(
            self._ctx,
            self._input_endpoints(len(self.units), 0),
            self._endpoint("profile") if recorder and not self._profile_proc else None,
            self.settings.hwm,
            recorder,
            self.main_counters,
            ordered=self.plan.sink_ordered,
            in_order=self.plan.in_order,
            curve=self._links.curve,
            cpu=self._cpu,
        )
        sinks = zip(self._input_names(len(self.units), 0), collector.sink_endpoints, strict=True)
        for name, bound in sinks:
            self._links.record(name, bound)
        if collector.profile_endpoint is not None:
            self._links.record("profile", collector.profile_endpoint)
        return collector

    def _input_names(self, unit: int, replica: int) -> list[str]:
        if unit == len(self.units):
            return list(self.plan.sink_binds)
        return list(self.plan.process(unit, replica).binds)

    def _input_endpoints(self, unit: int, replica: int) -> list[str]:
        return [self._endpoint(name) for name in self._input_names(unit, replica)]

    def _output_endpoints(self, unit: int, replica: int) -> list[str]:
        return [self._endpoint(name) for name in self.plan.process(unit, replica).connects]

    def _start_workers(self) -> None:
        for unit in self.units:
            try:
                self._blobs.append(cloudpickle.dumps(unit.leaves))
            except Exception as e:
                raise WorkerStartupError(
                    unit.name, f"it cannot be sent to a worker process ({e!r})"
                ) from e
        # Start every process before feeding any, so their imports overlap.
        self._procs.extend(self._popen() for _ in self._slots)
        batches = [list(range(len(self._slots)))]
        if self._links.bind_first:  # tcp: from the last unit back, each binds before its sender
            units = reversed(range(len(self.units)))
            batches = [[i for i, (u, _) in enumerate(self._slots) if u == unit] for unit in units]
        deadline = _Deadline(self.settings.startup_timeout)
        for batch in batches:
            for index in batch:
                self._send_spec(index)
            self._wait_ready(set(batch), deadline)

    def _popen(self) -> subprocess.Popen[bytes]:
        # glibc returns freed 1 MB blocks to the kernel at once, so every received frame
        # would fault in fresh pages; keep them (measured 1.16x on 1 MB frames).
        env = {**_MALLOC_KEEP_FREED, **os.environ}
        return child.start("pystream_zmq.worker.main", env=env)

    def _send_spec(self, index: int, restarted: bool = False) -> None:
        unit_index, replica = self._slots[index]
        unit = self.units[unit_index]
        pulls = self._input_endpoints(unit_index, replica)
        pushes = self._output_endpoints(unit_index, replica)
        spec = WorkerSpec(
            name=unit.name,
            pull=pulls[0],
            push=pushes[0],
            more_pulls=tuple(pulls[1:]),
            more_pushes=tuple(pushes[1:]),
            ordered_input=self.plan.processes[index].ordered_input,
            first_seq=None if restarted else 0,
            replica=replica if unit.replicas > 1 else None,
            profile=self._endpoint("profile") if self._recorder is not None else None,
            hwm=self.settings.hwm,
            control=self._endpoint("control"),
            ident=str(index).encode(),
            sys_path=list(sys.path),
            log_level=logging.getLogger("pystream_zmq").getEffectiveLevel(),
            raise_on=unit.raise_on,
            ipc_dir=self._dir,
            drop_policy=unit.drop_policy,
            max_age=self.settings.max_age,
            curve=self._links.curve,
            cpu=self._worker_cpus[index],
        )
        stdin = self._procs[index].stdin
        assert stdin is not None
        try:
            write_spec(stdin, spec, self._blobs[unit_index])
        except OSError as e:  # the process died before reading its spec
            raise WorkerStartupError(unit.name, f"its process exited at start ({e})") from e

    def _relaunch(self, index: int) -> None:
        """Called by the supervisor: the same stage, from its original definition."""
        old = self._procs[index]
        if old.stdin is not None:
            with contextlib.suppress(OSError):
                old.stdin.close()
        self._procs[index] = self._popen()
        self._send_spec(index, restarted=True)
        self._resend_eos()  # a drain's marker may have died with the old worker

    def _wait_ready(self, waiting: set[int], deadline: _Deadline) -> None:
        while waiting:
            if self._control.poll(min(100, deadline.left_ms())):
                found = self._from_worker(self._control.recv_multipart())
                if found is None:
                    continue
                index, (kind, *rest) = found
                if kind == transport.FAILED:
                    detail = b"".join(rest).decode(errors="replace").strip()
                    raise WorkerStartupError(
                        self._names[index], detail.rpartition("\n")[2] + "\n" + detail
                    )
                waiting.discard(index)
                self._ready.add(index)
                inputs = self._input_names(*self._slots[index])
                for name, bound in zip(inputs, rest, strict=False):  # where it bound them
                    self._links.record(name, bound.decode(errors="replace"))
                continue
            for index in sorted(waiting):
                code = self._procs[index].poll()
                if code is not None:
                    raise WorkerStartupError(
                        self._names[index], f"its process exited with code {code}"
                    )
            if not deadline.left():
                names = ", ".join(self._names[i] for i in sorted(waiting))
                raise WorkerStartupError(
                    names, f"not ready after {self.settings.startup_timeout:g} s"
                )

    # -- data ----------------------------------------------------------------------------
    def _raise_if_failed(self) -> None:
        if self._supervisor.failed is not None:
            raise self._supervisor.failed
        failure = self._collector.take_failure()
        if failure is not None:
            raise failure

    def forward(self, data: Any) -> bool:
        self._raise_if_failed()
        sent_at = time.time()
        frames = codec.encode(data)
        if self._feeder is not None:
            return self._park(frames, sent_at)
        timeout = self.settings.input_timeout if self.settings.block_input else 0.0
        if self.settings.drop_policy == transport.DROP_NEWEST:
            timeout = 0.0
        with self._source_lock:
            self._check_open()
            message = transport.pack_message(transport.KIND_DATA, self._next_seq, sent_at, frames)
            if not self._send_source(message, _Deadline(timeout)):
                self.refused += 1
                self._raise_if_failed()
                return False
            self._next_seq += 1
            self.forwarded += 1
            return True

    def _park(self, frames: list[bytes | memoryview], sent_at: float) -> bool:
        """Under "latest": the item waits for the feeder, replacing (and dropping) the one that
        was still waiting. Never blocks; True unless the pipeline is closed."""
        owned = [bytes(frame) for frame in frames]  # the caller may reuse its arrays
        with self._pending_cond:
            self._check_open()
            if self._pending is not None:
                self.replaced += 1
            self._pending = (owned, sent_at)
            self._pending_cond.notify_all()
        return True

    def _feed(self) -> None:
        """Under "latest": send the waiting item as soon as the pipeline has room for it;
        if a newer one arrives meanwhile, that one goes instead.

        Room means credits: at most one item per worker in flight (sent and not yet out,
        delivered or as a drop marker). ZeroMQ's queues and the kernel's socket buffers can
        hold thousands of small messages beyond the high-water mark, where no worker could
        see them to skip them; credits keep them empty. Items in flight when a worker
        restarts may be lost and never come out, so a restart gives their credits back."""
        window = len(self._slots)
        restarts = 0
        settled = 0  # items sent before the last restart count as out
        while True:
            with self._pending_cond:
                self._pending_cond.wait_for(lambda: self._pending is not None or self._closed)
            if sum(self._supervisor.restarts) != restarts:
                restarts, settled = sum(self._supervisor.restarts), self._next_seq
            out = max(settled, self._collector.ledger.next_seq)
            if self._next_seq - out >= window and not self._closed:
                self._collector.wait_for_out(self._next_seq - window + 1, _FEED_POLL_MS / 1000)
                continue
            with self._source_lock:
                if self._closed:
                    return
                if not self._source.wait_for_room(_FEED_POLL_MS):
                    continue  # let drain() and close() have the lock now and then
                with self._pending_cond:
                    item, self._pending = self._pending, None
                    self._pending_cond.notify_all()
                if item is None:
                    continue
                frames, sent_at = item
                message = transport.pack_message(
                    transport.KIND_DATA, self._next_seq, sent_at, frames
                )
                if not self._source.try_send(message, copy=False)[0]:
                    # room went between poll and send: wait again, unless
                    with self._pending_cond:  # a newer item came, which replaces this one
                        if self._pending is None:
                            self._pending = item
                        else:
                            self.replaced += 1
                    continue
                self._next_seq += 1
                self.forwarded += 1

    def _wait_sent(self, deadline: _Deadline) -> bool:
        """Under "latest": wait until the feeder has sent the waiting item (drain does)."""
        with self._pending_cond:
            while self._pending is not None and self._supervisor.failed is None:
                if not deadline.left():
                    return False
                self._pending_cond.wait(min(deadline.left(), 0.1))
            return self._pending is None

    def _send_source(self, message: list[Any], deadline: _Deadline) -> bool:
        """Send an item to the first stage, waiting for room up to the deadline. copy=True:
        the caller may reuse its arrays as soon as forward() returns."""
        return self._in_slices(deadline, lambda ms: self._source.send(message, ms, copy=True))

    def _wait_writable(self, deadline: _Deadline, sock: zmq.Socket[Any]) -> bool:
        """Wait for room in ``sock`` (to one replica of the first stage)."""
        return self._in_slices(deadline, lambda ms: bool(sock.poll(ms, zmq.POLLOUT)))

    def _in_slices(self, deadline: _Deadline, attempt: Callable[[int], bool]) -> bool:
        """Retry ``attempt(timeout_ms)`` in slices of at most 100 ms until it succeeds or the
        deadline passes, so a worker that can no longer be restarted ends the wait at once
        instead of at the timeout."""
        while not attempt(min(deadline.left_ms(), 100)):
            if not deadline.left() or self._supervisor.failed is not None:
                return False
        return True

    def stats(self) -> PipelineStats:
        """What the pipeline has done so far (see ``Pipeline.stats``)."""
        stages = dict(self.worker_counters)
        if not self._closed:
            for reply in self._ask_all(transport.GET_COUNTERS, _STATS_TIMEOUT).values():
                stages.update(_decode_counters(reply, transport.COUNTERS) or {})
        restarts = self._supervisor.restarts if hasattr(self, "_supervisor") else []
        workers = tuple(
            WorkerStats(
                name,
                proc.pid,
                not self._closed and index in self._ready and proc.poll() is None,
                restarts[index] if restarts else 0,
            )
            for index, (name, proc) in enumerate(zip(self._names, self._procs, strict=True))
        )
        counters = self.main_counters()
        with self._collector.locked():
            ledger = self._collector.ledger
            lost_ranges, out = tuple(ledger.lost_ranges), ledger.next_seq
        curve = self._links.curve
        return PipelineStats(
            mode="parallel",
            forwarded=counters["forwarded"],
            refused=counters["refused"],
            replaced=counters["replaced"],
            delivered=counters["delivered"],
            dropped=counters["dropped"],
            lost=counters["lost"],
            lost_ranges=lost_ranges,
            out=out,
            decode_errors=counters["decode_errors"],
            workers=workers,
            stages=stages,
            endpoints=self._links.bound(),
            socket_dir=self._dir,
            curve_public_key=curve.public if curve is not None else None,
        )

    def main_counters(self) -> dict[str, int]:
        """The orchestrator's counters, recorded under MainPipeline."""
        counters = {
            "forwarded": self.forwarded,
            "refused": self.refused,
            "replaced": self.replaced,
            "delivered": self._collector.delivered,
            "dropped": self._collector.ledger.dropped,
            "lost": self._collector.ledger.lost,
            "decode_errors": self._collector.decode_errors,
        }
        if self._sink_recorder is not None:
            counters["dropped_events"] = self._sink_recorder.dropped_events
        return counters

    def get_results(self) -> Any:
        self._raise_if_failed()
        timeout = self.settings.output_timeout if self.settings.block_output else 0.0
        return self._collector.take_latest(timeout)

    def drain(self, timeout: float) -> bool:
        """Deliver everything forwarded so far: an end-of-stream marker follows the items
        through every worker, and the sink seeing it means all before it arrived."""
        deadline = _Deadline(timeout)
        if self._feeder is not None and not self._wait_sent(deadline):
            return False
        with self._source_lock:
            self._check_open()
            self._next_eos += 1
            token = self._draining = self._next_eos
            forwarded = self._next_seq
            marker = transport.pack_envelope(transport.KIND_EOS, token, time.time())
            for sock in self._source.sockets:  # through every replica of the first stage
                if not self._wait_writable(deadline, sock):
                    return False
                sock.send(marker, zmq.NOBLOCK)
        # In slices, so a worker that can no longer be restarted ends the wait at once.
        drained = False
        while not drained and deadline.left() and self._supervisor.failed is None:
            drained = self._collector.wait_for_eos(token, min(deadline.left(), 0.1))
        self._draining = 0
        if drained:
            self._collector.settle(forwarded)  # what has not come out by now is lost
        return drained

    def _resend_eos(self) -> None:
        with self._source_lock:
            if self._draining and not self._closed:
                envelope = transport.pack_envelope(transport.KIND_EOS, self._draining, time.time())
                for sock in self._source.sockets:
                    with contextlib.suppress(zmq.Again):
                        sock.send(envelope, zmq.NOBLOCK)

    # -- control -------------------------------------------------------------------------
    def _alive(self) -> list[int]:
        return [i for i in sorted(self._ready) if self._procs[i].poll() is None]

    def _ask_all(self, command: bytes, timeout: float) -> dict[int, list[bytes]]:
        """Send a command to every live worker and collect one reply from each."""
        deadline = _Deadline(timeout)
        waiting = set(self._alive())
        for index in list(waiting):
            try:
                self._control.send_multipart([str(index).encode(), command])
            except zmq.ZMQError:  # never connected (ROUTER_MANDATORY): nothing to ask
                waiting.discard(index)
        replies: dict[int, list[bytes]] = {}
        while waiting and self._control.poll(deadline.left_ms()):
            found = self._from_worker(self._control.recv_multipart())
            if found is None:
                continue
            index, reply = found
            if reply[:1] == [transport.READY]:  # a restarted worker announcing itself
                continue
            replies[index] = reply
            waiting.discard(index)
        for index in waiting:
            log.warning("worker %s did not answer %r in time", self._names[index], command)
        return replies

    def _from_worker(self, message: list[bytes]) -> tuple[int, list[bytes]] | None:
        """(worker index, reply) from a control message; None, logged, when it is not from
        one of our workers (only they should reach this private endpoint)."""
        ident, *reply = message
        index = int(ident) if ident.isdigit() and len(ident) < 8 else -1
        if not reply or not 0 <= index < len(self._slots):
            # A READY nobody read before its worker died: the restarted worker took the
            # routing id over (ROUTER_HANDOVER), and ZeroMQ renamed the dead connection.
            if reply[:1] != [transport.READY]:
                log.warning("ignored a control message from unknown peer %r", ident[:16])
            return None
        return index, reply

    def collect_state(self, command: bytes = transport.GET_STATE) -> dict[str, dict[str, Any]]:
        """Each worker's stage attributes ({path: {name: value}}), after ``command``."""
        states: dict[str, dict[str, Any]] = {}
        sent = 0
        for index, reply in self._ask_all(command, self.settings.stop_timeout).items():
            if reply[0] != transport.STATE or len(reply) < 2 or len(reply[1]) != 8:
                continue
            sent += int.from_bytes(reply[1], "little")
            try:
                state = codec.decode(reply[2:])
            except DecodeError as e:
                log.warning("unreadable state from %s: %s", self._names[index], e)
                continue
            if isinstance(state, dict):
                states.update(state)
        self._events_sent = sent  # by the workers now running; the flush waits for them
        return states

    def flush_profile(self, timeout: float = 5.0) -> None:
        """Wait until the profile records sent so far are stored: the collector's, and the
        workers' as of the last collect_state() (the writer process's)."""
        if self._profile_proc is None:
            return
        deadline = _Deadline(timeout)
        self._collector.flush_events(deadline.left())
        if self._profile_proc.flush(deadline.left(), self._events_sent) is None:
            log.warning("the profile writer did not flush in %.1f s", timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise PipelineStateError("the pipeline has been cleaned up")

    # -- shutdown ------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every worker within ``stop_timeout``: STOP, wait for BYE and their last
        profile events, close their stdin (the acknowledgement that lets them exit), then
        terminate and kill whatever is left. Idempotent."""
        if self._closed:
            return
        with self._source_lock:
            self._closed = True
        with self._pending_cond:
            self._pending_cond.notify_all()
        if self._feeder is not None:
            self._feeder.join()
        if hasattr(self, "_supervisor"):
            self._supervisor.stop()
        deadline = _Deadline(self.settings.stop_timeout)
        replies = self._ask_all(transport.STOP, deadline.left())
        for reply in replies.values():
            self.worker_counters.update(_decode_counters(reply, transport.BYE) or {})
        # Every worker that said BYE sent its profile END before it.
        if self._profile_proc is not None:
            self._profile_proc.wait_for_ends(len(replies), deadline.left())
        elif self._recorder is not None:
            self._collector.wait_for_profile_ends(len(replies), deadline.left())
        _teardown(self._procs, self._dir, deadline.left())
        self._collector.stop()
        if self._sink_recorder is not None:
            self._sink_recorder.counters(
                {MAIN_PIPELINE_NAME: self.main_counters(), **self.worker_counters}
            )
        if self._profile_proc is not None:
            self._profile_proc.close(max(deadline.left(), 1.0))
        self._finalizer.detach()
        security.stop_authenticator(self._auth)
        self._ctx.destroy(linger=0)


def _decode_counters(reply: list[bytes], kind: bytes) -> dict[str, dict[str, int]] | None:
    """The counters a worker sent in a reply of ``kind``; None when it is not one."""
    if not reply or reply[0] != kind:
        return None
    try:
        counters = codec.decode(reply[1:])
    except DecodeError:
        return None
    return counters if is_counters(counters) else None


_WITH_PAYLOAD = (transport.KIND_DATA, transport.KIND_FAILED)


def _stage_error(seq: int, report: Any) -> StageError:
    if not (isinstance(report, dict) and all(isinstance(v, str) for v in report.values())):
        return StageError("?", seq, "a stage failed, with an unreadable report", "")
    return StageError(
        report.get("stage", "?"), seq, report.get("message", ""), report.get("traceback", "")
    )


def _teardown(procs: list[subprocess.Popen[bytes]], directory: str, grace: float = 1.0) -> None:
    """Let workers exit, stop those that do not; remove the socket files."""
    child.stop(procs, grace)
    shutil.rmtree(directory, ignore_errors=True)


class Collector(threading.Thread):
    """Background thread that owns the sink and profile sockets: keeps the latest output,
    records MainPipeline timings, notices end-of-stream markers and forwards profile events.
    The orchestrator uses it, and so does ``pystream-worker sink``."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        sink_endpoints: list[str],
        profile_endpoint: str | None,
        hwm: int,
        recorder: Recorder | None,
        main_counters: Callable[[], dict[str, int]],
        *,
        ordered: bool = False,
        in_order: bool = True,
        curve: security.Curve | None = None,
        cpu: int | None = None,
    ) -> None:
        """One sink endpoint per replica of the last stage; ``ordered``: merge them in
        sequence order; ``in_order``: whether outputs arrive in input order at all;
        ``curve``: bind as CURVE servers (the context's authenticator checks the clients);
        ``cpu``: the CPU to run on (pin_cpus)."""
        super().__init__(name="pystream-collector", daemon=True)
        self._cpu = cpu
        sinks = []
        self.sink_endpoints: list[str] = []  # as bound: tcp://HOST:* with the port chosen
        for endpoint in sink_endpoints:
            sinks.append(transport.make_socket(ctx, zmq.PULL, hwm))
            self.sink_endpoints.append(security.bind(sinks[-1], endpoint, curve))
        self._inputs = Inputs(sinks, ordered=ordered, burst=_BURST)
        self._profile: zmq.Socket[Any] | None = None
        self.profile_endpoint: str | None = None
        if profile_endpoint is not None:
            self._profile = transport.make_socket(ctx, zmq.PULL, 1000)
            self.profile_endpoint = security.bind(self._profile, profile_endpoint, curve)
        self._recorder = recorder  # worker batches go straight on; our own events are batched
        self._events = EventBuffer(recorder.events) if recorder is not None else None
        self._main_counters = main_counters
        self._counters_recorded = time.monotonic()
        self._wake_endpoint = f"inproc://wake-{id(self)}"
        self._wake_rx = ctx.socket(zmq.PAIR)
        self._wake_rx.bind(self._wake_endpoint)
        self._wake_tx = ctx.socket(zmq.PAIR)
        self._wake_tx.connect(self._wake_endpoint)
        self._wake_lock = threading.Lock()  # user threads share _wake_tx
        self._flush_asked = self._flushed = 0
        self._cond = threading.Condition()
        self._latest: Any = None
        self._has_new = False
        self._eos_seen = 0
        self._ended = False  # an end-of-stream marker arrived, and no data after it
        self._profile_ends = 0
        self.delivered = 0
        self.ledger = Ledger(in_order=in_order)
        self._failure: StageError | None = None
        self.decode_errors = 0
        self.dropped_events = 0

    # -- called from the user's threads ---------------------------------------------------
    def locked(self) -> threading.Condition:
        """Hold it to read the ledger and counters consistently."""
        return self._cond

    def take_latest(self, timeout: float) -> Any:
        with self._cond:
            if timeout > 0:
                self._cond.wait_for(lambda: self._has_new, timeout)
            if not self._has_new:
                return None
            self._has_new = False
            latest, self._latest = self._latest, None
            return latest

    def take_failure(self) -> StageError | None:
        """The first stage error reported under on_error="raise", once."""
        if self._failure is None:  # forward() asks per item: spare it the collector's lock
            return None
        with self._cond:
            failure, self._failure = self._failure, None
            return failure

    def settle(self, forwarded: int) -> None:
        with self._cond:
            self.ledger.settle(forwarded)

    def wait_for_out(self, seq: int, timeout: float) -> bool:
        """Wait until every item below ``seq`` came out (delivered, dropped or lost)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.ledger.next_seq >= seq, timeout)

    def wait_for_eos(self, token: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._eos_seen >= token, timeout)

    def wait_for_end(self, timeout: float) -> bool:
        """Wait until the last message received is an end-of-stream marker."""
        with self._cond:
            return self._cond.wait_for(lambda: self._ended, timeout)

    def wait_for_profile_ends(self, count: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._profile_ends >= count, timeout)

    def flush_events(self, timeout: float) -> bool:
        """Hand the MainPipeline events buffered so far to the recorder."""
        with self._wake_lock:
            if not self.is_alive():
                return False
            self._flush_asked += 1
            target = self._flush_asked
            self._wake_tx.send(b"flush")
        with self._cond:
            return self._cond.wait_for(lambda: self._flushed >= target, timeout)

    def stop(self) -> None:
        if self.is_alive():
            with self._wake_lock:
                self._wake_tx.send(b"")
            self.join()
        else:
            self._close_sockets()

    # -- the thread ----------------------------------------------------------------------
    def run(self) -> None:
        if self._cpu is not None:
            cpus.pin_this_thread(self._cpu)
        poller = zmq.Poller()
        poller.register(self._wake_rx, zmq.POLLIN)
        if self._profile is not None:
            poller.register(self._profile, zmq.POLLIN)
        for sink in self._inputs.sockets:
            poller.register(sink, zmq.POLLIN)
        try:
            while True:
                if self._inputs.ordered:  # poll only the sinks without a waiting item
                    wanted = self._inputs.wanted()
                    for sink in self._inputs.sockets:
                        poller.register(sink, zmq.POLLIN if sink in wanted else 0)
                ready = dict(poller.poll(self._inputs.poll_ms(_IDLE_FLUSH_MS)))
                if self._events is not None:
                    self._events.flush_if_old()
                    self._record_counters_if_due()
                if self._wake_rx in ready:
                    if not self._wake_rx.recv():
                        return
                    if self._events is not None:
                        self._events.flush()
                    with self._cond:
                        self._flushed += 1
                        self._cond.notify_all()
                self._on_outputs(self._inputs.take(ready))
                if self._profile is not None and self._profile in ready:
                    self._on_profile(self._profile.recv_multipart())
        finally:
            if self._events is not None:
                self._events.flush()
            self._close_sockets()

    def _on_outputs(self, messages: Iterable[list[zmq.Frame]]) -> None:
        """Decode what arrived, then hand it over under one lock for the whole burst."""
        arrived = []
        for frames in messages:
            end = time.time()
            try:
                kind, seq, sent_at = transport.unpack_envelope(frames[0])
                data = None
                if kind in _WITH_PAYLOAD:  # adopt: the frames were just received, and are ours
                    data = codec.decode(transport.payload(frames), adopt=True)
            except DecodeError as e:
                self.decode_errors += 1
                log.warning("dropped a malformed output: %s", e)
                continue
            arrived.append((kind, seq, data))
            if kind == transport.KIND_DATA and self._events is not None:
                self._events.add((MAIN_PIPELINE_NAME, seq, sent_at, sent_at, end))
        if not arrived:
            return
        with self._cond:
            for kind, seq, data in arrived:
                self._ended = kind == transport.KIND_EOS
                if kind == transport.KIND_EOS:
                    self._eos_seen = max(self._eos_seen, seq)
                elif kind == transport.KIND_DATA:
                    self.ledger.arrived(seq)
                    self._latest, self._has_new = data, True
                    self.delivered += 1
                else:
                    self.ledger.arrived(seq, dropped=True)
                    if kind == transport.KIND_FAILED and self._failure is None:
                        self._failure = _stage_error(seq, data)
            self._cond.notify_all()

    def _on_profile(self, message: list[bytes]) -> None:
        if message[0] == transport.PROFILE_END:
            with self._cond:
                self._profile_ends += 1
                self._cond.notify_all()
        elif self._recorder is None:
            return
        elif message[0] == transport.EVENTS and len(message) == 2:
            try:
                self._recorder.events(unpack_events(message[1]))
            except DecodeError as e:
                self._profile_error(f"dropped malformed profile events: {e}")
        elif message[0] == transport.COUNTERS:
            try:
                counters = codec.decode(message[1:])
            except DecodeError as e:
                self._profile_error(f"dropped malformed counters: {e}")
                return
            if is_counters(counters):
                self._recorder.counters(counters)
            else:
                self._profile_error("dropped counters that are not {path: {name: int}}")
        else:
            kind = message[0][:32]
            self._profile_error(f"dropped a profile message: {kind!r}, {len(message)} frames")

    def _profile_error(self, text: str) -> None:
        self.decode_errors += 1
        log.warning("%s", text)

    def _record_counters_if_due(self) -> None:
        if self._recorder is not None and (
            time.monotonic() - self._counters_recorded >= _COUNTERS_INTERVAL
        ):
            self._counters_recorded = time.monotonic()
            self._recorder.counters({MAIN_PIPELINE_NAME: self._main_counters()})

    def _close_sockets(self) -> None:
        for sock in (*self._inputs.sockets, self._profile, self._wake_rx, self._wake_tx):
            if sock is not None:
                sock.close(linger=0)
