"""One-frame messages gathered to go as one ZeroMQ message (transport.KIND_BATCH): a
ZeroMQ message costs the sender, the receiver and both I/O threads more than a small item's
own work. ``forward()`` (orchestrator/ingress.py) and each worker (worker/sending.py) keep
one; what decides when an item joins it, and who sends it, is theirs."""

from __future__ import annotations

import time
from typing import Any

from pystream_zmq.wire import transport

WAIT = 0.001  # seconds the first message of a batch may wait for the others
ITEM_BYTES = 4096  # larger items go alone: a message costs little next to their bytes


def fits(message: list[Any]) -> bool:
    """Whether ``message`` may join a batch: one frame, small."""
    return len(message) == 1 and len(message[0]) <= ITEM_BYTES


class Batch:
    def __init__(self) -> None:
        self._frames: list[bytes] = []
        self._bytes = 0
        self._since = 0.0  # when the first message joined (time.monotonic())
        self.counters = {"batches": 0, "batched": 0}  # sent, and the items they held

    def __len__(self) -> int:
        return len(self._frames)

    def add(self, frame: bytes) -> None:
        if not self._frames:
            self._since = time.monotonic()
        self._frames.append(frame)
        self._bytes += len(frame)

    def due(self) -> bool:
        """Whether it must go now: full, or its first message has waited WAIT."""
        return bool(self._frames) and (
            len(self._frames) >= transport.BATCH_MAX_ITEMS
            or self._bytes >= transport.BATCH_MAX_BYTES
            or time.monotonic() - self._since >= WAIT
        )

    def left(self) -> float:
        """Seconds until it is due by age."""
        return self._since + WAIT - time.monotonic()

    def frame(self) -> bytes:
        """What to send: the message alone (one is no batch), or the batch."""
        frames = self._frames
        return frames[0] if len(frames) == 1 else transport.pack_batch(frames)

    def sent(self) -> None:
        """``frame()`` went: count it, and start again."""
        if len(self._frames) > 1:
            self.counters["batches"] += 1
            self.counters["batched"] += len(self._frames)
        self.clear()

    def clear(self) -> int:
        """Forget the messages; how many there were."""
        count = len(self._frames)
        self._frames.clear()
        self._bytes = 0
        return count
