"""The orchestrator's end of the chain: a thread that owns the sink sockets (one per replica
of the last stage) and, over tcp, the profile socket. It keeps the latest output, feeds the
ledger, records MainPipeline's timings and counters, notices end-of-stream markers and
stage failures, and hands profile messages to a ProfileReceiver. ``pystream-worker sink``
runs one too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from pystream_zmq import cpus
from pystream_zmq.errors import DecodeError, StageError
from pystream_zmq.every import EveryOutput
from pystream_zmq.orchestrator.ledger import Ledger
from pystream_zmq.profiling.receiver import ProfileReceiver
from pystream_zmq.profiling.store import Recorder
from pystream_zmq.stage import MAIN_PIPELINE_NAME, EventBuffer
from pystream_zmq.wire import codec, formats, security, status, transport
from pystream_zmq.wire.inputs import Inputs

if TYPE_CHECKING:
    from pystream_zmq.shm.receiver import Views

log = logging.getLogger(__name__)

_IDLE_FLUSH_MS = 200
_BURST = 64  # outputs read per wake-up of the collector
_COUNTERS_INTERVAL = 1.0  # how often the collector records the orchestrator's counters
_PEER_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED  # a connection opens, closes


_WITH_PAYLOAD = (transport.KIND_DATA, transport.KIND_FAILED)  # the marker kinds with a payload


def _stage_error(seq: int, report: Any) -> StageError:
    if not (isinstance(report, dict) and all(isinstance(v, str) for v in report.values())):
        return StageError("?", seq, "a stage failed, with an unreadable report", "")
    return StageError(
        report.get("stage", "?"), seq, report.get("message", ""), report.get("traceback", "")
    )


class Collector(threading.Thread):
    """Background thread that owns the sink and profile sockets: keeps the latest output,
    records MainPipeline timings, notices end-of-stream markers and forwards profile events.
    ``main_counters`` gives what it records for MainPipeline every second (its own
    ``counters()`` and whatever the owner adds)."""

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
        sent_below: Callable[[], int] | None = None,
        max_message_bytes: int = codec.DEFAULT_MAX_MESSAGE_BYTES,
        status_link: tuple[str, Callable[[list[bytes]], None]] | None = None,
        input_format: str = formats.PYSTREAM,
        shared: Views | None = None,
    ) -> None:
        """One sink endpoint per replica of the last stage; ``ordered``: merge them in
        sequence order; ``in_order``: whether outputs arrive in input order at all;
        ``curve``: bind as CURVE servers (the context's authenticator checks the clients);
        ``cpu``: the CPU to run on (pin_cpus); ``sent_below()``: no sequence number at or
        above it was sent (an output with one is a rogue, see Ledger); ``status_link``: where
        to bind the workers' status link, and what takes each message from it
        (``StallBoard.take``); ``input_format``: what the sinks receive (wire/formats.py);
        ``shared``: the shared-memory pools the last stage sends into (pystream_zmq.shm)."""
        super().__init__(name="pystream-collector", daemon=True)
        self._cpu = cpu
        sinks = []
        self.sink_endpoints: list[str] = []  # as bound: tcp://HOST:* with the port chosen
        for endpoint in sink_endpoints:
            sinks.append(transport.make_socket(ctx, zmq.PULL, hwm))
            self.sink_endpoints.append(security.bind(sinks[-1], endpoint, curve))
        for sink in sinks:
            sink.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._decode = formats.decoder(input_format, max_message_bytes, shared)
        foreign = input_format == formats.MSGPACK_NUMPY
        self._inputs = Inputs(sinks, ordered=ordered, burst=_BURST, foreign=foreign)
        self._profile: zmq.Socket[Any] | None = None
        self._profile_monitor: zmq.Socket[Any] | None = None
        self.profile_endpoint: str | None = None
        if profile_endpoint is not None:
            self._profile = transport.make_socket(ctx, zmq.PULL, 1000)
            # Watched before it binds, so that no peer's connection goes uncounted.
            self._profile_monitor = self._profile.get_monitor_socket(_PEER_EVENTS)
            self.profile_endpoint = security.bind(self._profile, profile_endpoint, curve)
        self._status: zmq.Socket[Any] | None = None
        self.status_endpoint: str | None = None
        self._on_status: Callable[[list[bytes]], None] = lambda message: None
        if status_link is not None:
            self._status = transport.make_socket(ctx, zmq.PULL, 1000)
            self._status.setsockopt(zmq.MAXMSGSIZE, status.MAX_BYTES)
            self.status_endpoint = security.bind(self._status, status_link[0], curve)
            self._on_status = status_link[1]
        self._recorder = recorder
        self._receiver = ProfileReceiver(recorder)  # worker batches go straight on
        self._events = EventBuffer(recorder.events) if recorder is not None else None  # ours
        self._main_counters = main_counters
        self._counters_recorded = time.monotonic()
        self._wake_endpoint = f"inproc://wake-{id(self)}"
        self._wake_rx = ctx.socket(zmq.PAIR)
        self._wake_rx.bind(self._wake_endpoint)
        self._wake_tx = ctx.socket(zmq.PAIR)
        self._wake_tx.connect(self._wake_endpoint)
        self._wake_lock = threading.Lock()  # user threads share _wake_tx
        self._flush_asked = self._flushed = 0
        self._profile_peers = 0  # connections to the profile socket now open
        self._cond = threading.Condition()
        self._latest: Any = None
        self._has_new = False
        self._eos_seen = 0
        self._ended = False  # an end-of-stream marker arrived, and no data after it
        self.delivered = 0
        self.ledger = Ledger(in_order=in_order, sent_below=sent_below)
        self.every = EveryOutput(self._cond)  # for results(); its unread outputs hold credits
        self._failure: StageError | None = None
        self._output_errors = 0  # malformed outputs (malformed profile messages: receiver)

    # -- called from the user's threads ---------------------------------------------------
    def locked(self) -> threading.Condition:
        """Hold it to read the ledger and counters consistently."""
        return self._cond

    @property
    def decode_errors(self) -> int:
        """Malformed messages received, on the sink and the profile socket, and dropped."""
        return self._output_errors + self._receiver.malformed

    def counters(self) -> dict[str, int]:
        """What came out of the pipeline, by sequence number, and what could not be read."""
        with self._cond:
            return {
                "delivered": self.delivered,
                "dropped": self.ledger.dropped,
                "lost": self.ledger.lost,
                "rogue": self.ledger.rogue,
                "decode_errors": self.decode_errors,
            }

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

    def out(self) -> int:
        """How many items are out: delivered (and read, by a results() reader), dropped or
        lost; as a count, not a sequence number."""
        return self.ledger.next_seq - self.every.unread()

    def wait_for_out(self, seq: int, timeout: float) -> bool:
        """Wait until ``out()`` reaches ``seq``."""
        with self._cond:
            return self._cond.wait_for(lambda: self.out() >= seq, timeout)

    def wait_for_eos(self, token: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._eos_seen >= token, timeout)

    def data_ended(self) -> bool:
        """The last message was a standalone source's end of data (transport.END_OF_DATA)."""
        with self._cond:
            return self._ended and self._eos_seen == transport.END_OF_DATA

    def wait_for_end(self, timeout: float) -> bool:
        """Wait until the last message received is an end-of-stream marker."""
        with self._cond:
            return self._cond.wait_for(lambda: self._ended, timeout)

    def wait_for_profile_ends(self, count: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._receiver.ends >= count, timeout)

    def wait_for_every_profile_end(self, timeout: float) -> tuple[int, int]:
        """Wait until as many PROFILE_ENDs have come as processes are connected to the
        profile socket (a standalone sink, which does not know how many there are):
        (ENDs received, connections open). A sender stays connected until after its END,
        since the chain closes from the sink back."""
        with self._cond:
            self._cond.wait_for(lambda: self._receiver.ends >= self._profile_peers, timeout)
            return self._receiver.ends, self._profile_peers

    def record_to(self, recorder: Recorder) -> None:
        """Record to ``recorder`` from now on; before start(), so that a sink registers its
        run only once its sockets are bound."""
        if self.is_alive():
            raise RuntimeError("record_to() must come before start()")
        self._recorder = recorder
        self._receiver.sink = recorder
        self._events = EventBuffer(recorder.events)

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
        for sock in (self._profile, self._status, self._profile_monitor):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
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
                if self._profile_monitor is not None and self._profile_monitor in ready:
                    self._on_profile_peer(recv_monitor_message(self._profile_monitor)["event"])
                if self._profile is not None and self._profile in ready:
                    self._on_profile(self._profile.recv_multipart())
                if self._status is not None and self._status in ready:
                    self._on_status(self._status.recv_multipart())
        finally:
            if self._events is not None:
                self._events.flush()
            self._close_sockets()

    def _on_outputs(self, messages: Iterable[list[zmq.Frame]]) -> None:
        """Decode what arrived, then hand it over under one lock for the whole burst."""
        arrived: list[tuple[int, int, Any]] = []
        for frames in messages:
            end = time.time()
            try:
                kind, seq, sent_at = transport.unpack_envelope(frames[0])
                data = None
                if kind in _WITH_PAYLOAD:
                    data = self._decode(frames)
            except DecodeError as e:
                self._output_errors += 1
                log.warning("dropped a malformed output: %s", e)
                if self._inputs.foreign:  # numbered here: the ledger counts it dropped
                    arrived.append((transport.KIND_DROPPED, seq, None))
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
                    if self.ledger.arrived(seq):  # not a rogue's, nor one seen already
                        self._latest, self._has_new = data, True
                        self.every.put(data)
                        self.delivered += 1
                else:
                    counted = self.ledger.arrived(seq, dropped=True)
                    if counted and kind == transport.KIND_FAILED and self._failure is None:
                        self._failure = _stage_error(seq, data)
            self._cond.notify_all()

    def _on_profile(self, message: list[bytes]) -> None:
        if self._receiver.take(message) == transport.PROFILE_END:
            with self._cond:
                self._cond.notify_all()

    def _on_profile_peer(self, event: int) -> None:
        with self._cond:
            self._profile_peers += 1 if event == zmq.EVENT_ACCEPTED else -1
            self._cond.notify_all()

    def _record_counters_if_due(self) -> None:
        if self._recorder is not None and (
            time.monotonic() - self._counters_recorded >= _COUNTERS_INTERVAL
        ):
            self._counters_recorded = time.monotonic()
            self._recorder.counters({MAIN_PIPELINE_NAME: self._main_counters()})

    def _close_sockets(self) -> None:
        if self._profile is not None and not self._profile.closed:  # stop() may come twice
            self._profile.disable_monitor()
        socks = (*self._inputs.sockets, self._profile, self._status, self._wake_rx, self._wake_tx)
        for sock in (*socks, self._profile_monitor):
            if sock is not None:
                sock.close(linger=0)
