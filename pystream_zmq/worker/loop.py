"""The worker loop: runs one unit of stages between its input (PULL) and output (PUSH)
sockets, answering the control channel when orchestrated (``worker.main``) or until told to
stop when standalone (``cli.roles``, for ``pystream-worker``).

A stop is seen deep down (STOP on the control channel, or ``done()`` turning true while a
send waits for room or for a release): it raises _Stop there, which ``run`` catches."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import zmq

from pystream_zmq import child
from pystream_zmq.errors import DecodeError, PyStreamError
from pystream_zmq.profiling.events import pack_events
from pystream_zmq.shm.handoff import Handoff
from pystream_zmq.shm.pools import Shared
from pystream_zmq.stage import (
    REPLICA_MARK,
    Event,
    EventBuffer,
    Leaf,
    StageChain,
    StageFailure,
    unsendable,
)
from pystream_zmq.throttle import Throttled
from pystream_zmq.wire import batch, codec, formats, security, transport
from pystream_zmq.wire.inputs import Inputs, Message
from pystream_zmq.worker import memory
from pystream_zmq.worker.sending import Sender, share_received_frames
from pystream_zmq.worker.spec import WorkerSpec
from pystream_zmq.worker.state import STATE_COMMANDS, StateCopy
from pystream_zmq.worker.watchdog import Watchdog

log = logging.getLogger(__name__)

_POLL_MS = 100  # how often an idle worker flushes its profile events
_BURST = 64  # items handled between two polls of the control socket
_LATEST_BATCH = 1024  # under drop_policy="latest", most messages read before picking the newest
_COUNTERS_INTERVAL = 1.0  # how often a profiled worker sends a snapshot of its counters
# Outputs that go in batches (worker/sending.py): small, from items handled this quickly,
# after _BATCH_AFTER such items in a row: no output should wait long for the next call.
_BATCH_ITEM_TIME = 0.0002
_BATCH_AFTER = 16
# What one state reply may hold: the orchestrator refuses messages over the codec's limit.
_STATE_BUDGET = codec.DEFAULT_MAX_MESSAGE_BYTES - 2**20


def _never() -> bool:
    return False


class _Stop(Exception):
    """Raised where the worker learns it must stop; ``run`` catches it."""


class Worker:
    def __init__(self, spec: WorkerSpec, leaves: list[Leaf], ctx: zmq.Context[Any]) -> None:
        self.spec = spec
        self.ctx = ctx
        self._input_events: list[zmq.Socket[Any]] = []
        pulls = [self._bind_input(endpoint) for endpoint in (spec.pull, *spec.more_pulls)]
        pushes = [self._connect_output(endpoint) for endpoint in (spec.push, *spec.more_pushes)]
        self.pull, self.push = pulls[0], pushes[0]
        # Where the inputs are bound: tcp://HOST:* gets its port from the OS.
        self.bound = [sock.getsockopt_string(zmq.LAST_ENDPOINT) for sock in pulls]
        burst = _LATEST_BATCH if spec.drop_policy == transport.LATEST else _BURST
        self.inputs = Inputs(
            pulls, ordered=spec.ordered_input, burst=burst, first_seq=spec.first_seq,
            foreign=spec.input_format == formats.MSGPACK_NUMPY,
        )  # fmt: skip
        self.outputs = formats.outputs(spec.output_format, pushes)
        self.shared: Shared | None = None  # orchestrated over ipc: shared-memory pools
        if spec.shm_fds:
            self.shared = Shared(
                spec.shm_fds, sends=spec.shm_sends, min_bytes=spec.shm_min_bytes,
            )  # fmt: skip
        views = self.shared.views if self.shared is not None else None
        # What it received from shared memory and passes on whole goes on without a copy,
        # when nothing here can see it again (shm.handoff); the rest to its own pool.
        self._handoff: Handoff | None = None
        shared = self.shared
        pystream_out = spec.output_format == formats.PYSTREAM
        if shared is not None and shared.allocator is not None and pystream_out:
            self._handoff = Handoff(shared.allocator, shared.views)
        placer = self._handoff
        self._decode = formats.decoder(spec.input_format, spec.max_message_bytes, views)
        self._pack = formats.packer(spec.output_format, spec.max_message_bytes, placer)
        self._sender = Sender(self.outputs, self._between_waits)
        self._batches = pystream_out  # a program outside PyStream reads one item per message
        self._quick_streak = 0  # items in a row handled within _BATCH_ITEM_TIME
        self.profile: zmq.Socket[Any] | None = None
        self.events: EventBuffer | None = None
        if spec.profile is not None:
            self.profile = transport.make_socket(ctx, zmq.PUSH, 1000)
            security.connect(self.profile, spec.profile, spec.curve)
            self.events = EventBuffer(self._send_events)
        self.chain = StageChain(leaves, self.events.add if self.events else None)
        self._state = StateCopy(leaves, spec.limits, _STATE_BUDGET)
        self.counters = {
            "processed": 0,
            "decode_errors": 0,
            "encode_errors": 0,
            "dropped_events": 0,
            "input_disconnects": 0,
            "replaced": 0,  # skipped under drop_policy="latest": a newer item was waiting
            "expired": 0,  # older than max_age when they arrived
            "discarded": 0,  # taken in, then let go by a stop before they were passed on
        }
        self.memory = memory.Memory(memory.unit_limit(spec.limits.values()))
        self.memory.check_at_start()
        self._last_seq = -1  # the item handled last, for the memory report
        self._watchdog: Watchdog | None = None
        self.events_sent = 0  # profile events handed to the profile socket
        self._control: zmq.Socket[Any] | None = None
        self._stop_request = b""  # the request id of the STOP that finish() answers
        self._done: Callable[[], bool] = _never
        # True once an end-of-stream marker passed with no data after it: upstream finished.
        self.upstream_done = False
        self.last_eos: int | None = None  # the sequence number of the last marker passed on
        self._counters_sent = time.monotonic()
        # At most a line per interval: a peer whose CURVE key is refused reconnects (and is
        # dropped again) every 10-20 ms.
        self._log_disconnect = Throttled(
            log,
            logging.INFO,
            "an input peer disconnected (it left, was refused, or sent a frame over %d bytes); "
            "%d so far",
        )

    def _bind_input(self, endpoint: str) -> zmq.Socket[Any]:
        pull = transport.make_socket(self.ctx, zmq.PULL, self.spec.hwm)
        pull.setsockopt(zmq.MAXMSGSIZE, self.spec.max_message_bytes)
        # ZeroMQ says nothing when MAXMSGSIZE drops a sender, but the disconnect: count those.
        self._input_events.append(pull.get_monitor_socket(zmq.EVENT_DISCONNECTED))
        security.bind(pull, endpoint, self.spec.curve)
        return pull

    def _connect_output(self, endpoint: str) -> zmq.Socket[Any]:
        push = transport.make_socket(self.ctx, zmq.PUSH, self.spec.hwm)
        if self.spec.control is None:
            # Standalone, the next process may be absent for a while (not started yet, or
            # restarting): queue nothing for it, wait until it is there.
            push.setsockopt(zmq.IMMEDIATE, 1)
        security.connect(push, endpoint, self.spec.curve)
        return push

    def counter_snapshot(self) -> dict[str, dict[str, int]]:
        """{path: {name: value}}: the unit's counters, and each stage's errors; a replica's
        paths end in #N, so that replicas do not overwrite each other."""
        suffix = "" if self.spec.replica is None else f"{REPLICA_MARK}{self.spec.replica}"
        counters = {**self.counters, **self.memory.counters(), **self._sender.batch.counters}
        if self.shared is not None and self.shared.allocator is not None:
            counters.update(self.shared.allocator.counters)  # its output link's
        if self.inputs.ordered:
            counters.update(reorder_skipped=self.inputs.skipped, reorder_late=self.inputs.late)
        snapshot = {self.spec.name + suffix: counters}
        for path, errors in self.chain.errors.items():
            snapshot.setdefault(path + suffix, {})["stage_errors"] = errors
        return snapshot

    def _send_counters_if_due(self) -> None:
        # Live values for `pystream top`; the exact final ones travel in BYE.
        if self.profile is None or time.monotonic() - self._counters_sent < _COUNTERS_INTERVAL:
            return
        self._counters_sent = time.monotonic()
        try:
            frames = codec.encode(self.counter_snapshot())
            self.profile.send_multipart([transport.COUNTERS, *frames], zmq.NOBLOCK)
        except zmq.Again:  # the next snapshot will do
            pass

    # -- profile events ------------------------------------------------------------------
    def _send_events(self, events: list[Event]) -> None:
        assert self.profile is not None
        try:
            self.profile.send_multipart([transport.EVENTS, pack_events(events)], zmq.NOBLOCK)
            self.events_sent += len(events)
        except zmq.Again:  # the collector is behind: drop rather than stall the data path
            self.counters["dropped_events"] += len(events)

    # -- data path -----------------------------------------------------------------------
    def _handle_item(self, frames: Message) -> None:
        """Process one message and send what it gives."""
        arrive = time.time()
        try:
            kind, seq, sent_at = transport.unpack_envelope(frames[0])
            if kind in (transport.KIND_DROPPED, transport.KIND_FAILED):
                self._sender.send([bytes(frame) for frame in frames])  # pass it on, in order
                return
            if kind == transport.KIND_EOS:
                if self.events is not None:
                    self.events.flush()
                marker = transport.pack_envelope(kind, seq, sent_at)  # anything after: dropped
                self._sender.send([marker], everywhere=True)  # every replica's
                self.upstream_done = True  # only now: done() may end the loop on it
                self.last_eos = seq
                return
            self.upstream_done = False
            self._last_seq = seq
            if self.spec.max_age is not None and arrive - sent_at > self.spec.max_age:
                self._drop(seq, sent_at, "expired", frames)
                return
            # In a list that the stages take it from: this frame holds no reference to
            # the item while it is encoded (shm.handoff counts them).
            box = [self._decode(frames)]
        except DecodeError as e:
            self.counters["decode_errors"] += 1
            log.warning("dropped a malformed message: %s", e)
            if self.inputs.foreign:  # numbered here: a marker in its place, as for every drop
                self._sender.send([transport.pack_envelope(transport.KIND_DROPPED, seq, sent_at)])
            return
        try:
            self._run_stages(frames, box, seq, sent_at, arrive)
        except _Stop:  # it stops while this item waits for room downstream
            self.counters["discarded"] += 1
            raise

    def _run_stages(
        self, frames: Message, box: list[Any], seq: int, sent_at: float, arrive: float
    ) -> None:
        """Run the stages on ``box[0]``, the item (``box``: the only reference to it), and
        send what they give."""
        self._sender.wait_for_release()
        ok, out = self.chain.run(box.pop(), seq, arrive)
        if not ok:
            self._sender.send(self._failure_frames(out, sent_at))
            return
        handoff = self._handoff
        if handoff is not None:  # what may go on without a copy, found while only
            box.append(out)  # ``box`` holds the item
            del out
            handoff.prepare(box)
            out = box.pop()
        try:
            message = self._pack(transport.KIND_DATA, seq, sent_at, out)
        except PyStreamError as e:  # encode_shared has cancelled what it placed
            self.counters["encode_errors"] += 1
            failure = unsendable(self.chain.leaves[-1][0], seq, e)
            self._sender.send(self._failure_frames(failure, sent_at))
            return
        self.counters["processed"] += 1
        quick = time.time() - arrive < _BATCH_ITEM_TIME
        self._quick_streak = self._quick_streak + 1 if quick else 0
        if (
            self._batches
            and self._quick_streak >= _BATCH_AFTER
            and batch.fits(message)
            and self.inputs.more_waiting()  # else it would go alone, only later
        ):
            self._sender.defer(message[0])
            if handoff is not None:
                handoff.done()
            return
        shared = len(message) > 1 and share_received_frames(message, frames)
        try:
            self._sender.send(message, tracked=not shared)
        except _Stop:  # not sent: what it would have passed on is this process's again
            if handoff is not None:
                handoff.cancel([])
            raise
        finally:
            if handoff is not None:
                handoff.done()

    def _drop(self, seq: int, sent_at: float, counter: str, frames: Message) -> None:
        """Drop an item unprocessed, counted, with a marker in its place for the ledger."""
        self.counters[counter] += 1
        if self.shared is not None:  # its arrays' leases: taken, and let go at once
            with contextlib.suppress(DecodeError):
                self._decode(frames)
        self._sender.send([transport.pack_envelope(transport.KIND_DROPPED, seq, sent_at)])

    def _handle_newest(self, waiting: list[Message]) -> None:
        """drop_policy="latest": of everything that was waiting, process only the newest
        item and drop the older ones (markers in their place, in order)."""
        kinds = [_peek_kind(frames) for frames in waiting]
        newest = max((i for i, kind in enumerate(kinds) if kind == transport.KIND_DATA), default=-1)
        for i, frames in enumerate(waiting):
            if i < newest and kinds[i] == transport.KIND_DATA:
                _, seq, sent_at = transport.unpack_envelope(frames[0])
                self.upstream_done = False
                self._drop(seq, sent_at, "replaced", frames)
            else:
                self._handle_item(frames)
                self._check_memory()
            self._stop_if_done()

    def _failure_frames(self, failure: StageFailure, sent_at: float) -> list[Any]:
        """The marker that travels in the item's place, so the orchestrator can tell a
        dropped item from a lost one, and raise StageError where the policy asks for it."""
        if failure.path not in self.spec.raise_on:
            return [transport.pack_envelope(transport.KIND_DROPPED, failure.seq, sent_at)]
        report = {"stage": failure.path, "message": failure.message, "traceback": failure.traceback}
        frames = codec.encode(report)
        return transport.pack_message(transport.KIND_FAILED, failure.seq, sent_at, frames)

    def _between_waits(self) -> None:
        """While a send waits: keep answering the control channel, and stop when told to."""
        control = self._control
        if control is not None and control.poll(0):
            self._handle_control(control)
        self._stop_if_done()

    def _stop_if_done(self) -> None:
        if self._done():
            raise _Stop

    def _check_memory(self, after_item: bool = True) -> None:
        """Between items: past the memory limit, take no other; the orchestrator, told by
        the watchdog, kills and replaces this process. Until then the control channel is
        answered (a STOP ends the run as usual); if it does not come, leave."""
        if not self.memory.over_limit(after_item):
            return
        self._sender.flush()  # what is done goes on
        assert self._watchdog is not None
        self._watchdog.over_memory(self._last_seq, self.memory.rss, self.memory.limit)
        if self.events is not None:  # the items done so far keep their profile records
            self.events.flush()
        control = self._control
        until = time.monotonic() + memory.REPLACE_GRACE
        while control is not None and (left := until - time.monotonic()) > 0:
            if control.poll(max(1, int(left * 1000))):
                self._handle_control(control)
        child.leave(memory.EXIT_OVER_MEMORY)

    def _count_disconnects(self, monitor: zmq.Socket[Any]) -> None:
        while monitor.poll(0):
            monitor.recv_multipart()
            self.counters["input_disconnects"] += 1
            self._log_disconnect(self.spec.max_message_bytes, self.counters["input_disconnects"])

    # -- control -------------------------------------------------------------------------
    def state(self, everything: bool = False) -> dict[str, dict[str, Any]]:
        """Each stage's attributes that can be sent and changed since the last call
        (``everything``: all of them); see worker/state.py."""
        return self._state.reply(everything)

    def _handle_control(self, control: zmq.Socket[Any]) -> None:
        """Answer one command, echoing its request id; raises _Stop on STOP (finish() says
        BYE to it)."""
        command, *rest = control.recv_multipart()
        request = rest[0] if rest else b""
        if command in STATE_COMMANDS:
            cleanup, everything = STATE_COMMANDS[command]
            if cleanup:
                self.chain.cleanup()
            if self.events is not None:  # so that the profiles read next include them
                self.events.flush()
            sent = self.events_sent.to_bytes(8, "little")  # for the flush barrier
            state = codec.encode(self.state(everything))
            control.send_multipart([transport.STATE, request, sent, *state])
        elif command == transport.GET_COUNTERS:
            counters = codec.encode(self.counter_snapshot())
            control.send_multipart([transport.COUNTERS, request, *counters])
        elif command == transport.STOP:
            self._stop_request = request
            raise _Stop
        else:
            log.warning("ignored unknown control command %r", command[:32])

    def run(
        self, control: zmq.Socket[Any] | None = None, done: Callable[[], bool] = _never
    ) -> None:
        """Process items until STOP arrives on ``control`` (orchestrated) or ``done()``
        turns true (standalone, where ``control`` is None)."""
        self._control, self._done = control, done
        self._sender.wake_on = control
        poller = zmq.Poller()
        for monitor in self._input_events:
            poller.register(monitor, zmq.POLLIN)
        if control is not None:
            poller.register(control, zmq.POLLIN)
        for sock in self.inputs.sockets:
            poller.register(sock, zmq.POLLIN)
        watchdog = Watchdog(self.chain, self.spec, self.ctx, self._sender.flush_aside)
        self._watchdog = watchdog
        watchdog.start()
        try:
            while not done():
                self._serve(poller, control)
        except _Stop:
            self.counters["discarded"] += self._sender.abandon()
        finally:
            watchdog.stop()

    def _serve(self, poller: zmq.Poller, control: zmq.Socket[Any] | None) -> None:
        """One poll: count disconnects, answer control, handle the items that arrived."""
        if self.inputs.ordered:  # poll only the inputs without a waiting item
            wanted = self.inputs.wanted()
            for sock in self.inputs.sockets:
                poller.register(sock, zmq.POLLIN if sock in wanted else 0)
        ready = dict(poller.poll(self.inputs.poll_ms(_POLL_MS)))
        for monitor in self._input_events:
            if monitor in ready:
                self._count_disconnects(monitor)
        if control is not None and control in ready:
            self._handle_control(control)
        messages = self.inputs.take(ready)
        if self.spec.drop_policy == transport.LATEST:
            self._handle_newest(list(messages))
        else:
            for frames in messages:
                self._handle_item(frames)
                self._check_memory()
                self._stop_if_done()
                if self.events is not None:  # a slow stage may not leave the burst for long
                    self.events.flush_if_old()
        self._sender.flush()  # before it waits for input
        if self.events is not None:
            self.events.flush_if_old()
            self._send_counters_if_due()
        self._check_memory(after_item=False)  # the last items before a pause

    def finish(self, control: zmq.Socket[Any]) -> None:
        """Flush profile events, then say goodbye; the orchestrator acknowledges both by
        closing stdin (closing a socket earlier could lose what it had not read)."""
        if self.events is not None:
            self.events.flush()
        if self.profile is not None:
            self.profile.send_multipart(
                [transport.PROFILE_END, self.spec.ident], flags=0, copy=True
            )
        counters = codec.encode(self.counter_snapshot())
        control.send_multipart([transport.BYE, self._stop_request, *counters])


def _peek_kind(frames: Message) -> int | None:
    try:
        return transport.unpack_envelope(frames[0])[0]
    except DecodeError:
        return None  # _handle_item counts and logs it
