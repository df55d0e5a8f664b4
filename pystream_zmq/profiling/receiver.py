"""The one reader of the profile channel, shared by the orchestrator's collector (over tcp)
and the profile writer process (over ipc).

Messages, as the workers and the orchestrator's ProfileProcess send them: [EVENTS, packed
events] (events.pack_events), [COUNTERS, codec frames of {path: {name: int}}], and
[PROFILE_END, worker id] once per worker at its stop. They come from other processes:
anything malformed is logged, counted and dropped, never raised.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TypeGuard

from pystream_zmq.errors import DecodeError
from pystream_zmq.profiling.events import unpack_events
from pystream_zmq.profiling.store import Recorder
from pystream_zmq.stage import MAIN_PIPELINE_NAME
from pystream_zmq.wire import codec, transport

log = logging.getLogger(__name__)


def is_counters(value: object) -> TypeGuard[dict[str, dict[str, int]]]:
    """Whether a decoded message is {path: {name: int}} (it came from another process)."""
    return isinstance(value, dict) and all(
        isinstance(path, str)
        and isinstance(counters, dict)
        and all(isinstance(k, str) and type(v) is int for k, v in counters.items())
        for path, counters in value.items()
    )


class ProfileReceiver:
    """Parses profile messages and hands events and counters to ``sink``, the recorder
    that owns the store (a ``store.RunRecorder``). Without a sink, only PROFILE_END
    markers are counted and everything else is ignored.

    ``dropped_events`` of MainPipeline counts every profile event lost on its way into the
    database: the sender reports the events it could not hand over, and the receiver, the
    only one that knows what its store dropped, adds ``sink.dropped_events`` (as of that
    message) to the MainPipeline counters it passes on. A recorder that owns its store
    (RunRecorder) reports the store's drops itself, since no receiver stands between them.
    """

    def __init__(self, sink: Recorder | None) -> None:
        self.sink = sink
        self.ends = 0  # PROFILE_END markers received
        self.events = 0  # events received and handed to the sink
        self.malformed = 0  # messages dropped because they were not what they claimed

    def take(self, message: Sequence[bytes]) -> bytes:
        """Handle one message; returns its kind (its first frame)."""
        kind = message[0]
        if kind == transport.PROFILE_END:
            self.ends += 1
        elif self.sink is None:
            pass
        elif kind == transport.EVENTS and len(message) == 2:
            self._take_events(message[1])
        elif kind == transport.COUNTERS:
            self._take_counters(message[1:])
        else:
            self._malformed(f"dropped a profile message: {kind[:32]!r}, {len(message)} frames")
        return kind

    def _take_events(self, packed: bytes) -> None:
        assert self.sink is not None
        try:
            events = unpack_events(packed)
        except DecodeError as e:
            self._malformed(f"dropped malformed profile events: {e}")
            return
        self.events += len(events)
        self.sink.events(events)

    def _take_counters(self, frames: Sequence[bytes]) -> None:
        assert self.sink is not None
        try:
            counters = codec.decode(frames)
        except DecodeError as e:
            self._malformed(f"dropped malformed counters: {e}")
            return
        if not is_counters(counters):
            self._malformed("dropped counters that are not {path: {name: int}}")
            return
        main = counters.get(MAIN_PIPELINE_NAME, {})
        if "dropped_events" in main:
            main["dropped_events"] += self.sink.dropped_events
        self.sink.counters(counters)

    def _malformed(self, text: str) -> None:
        self.malformed += 1
        log.warning("%s", text)
