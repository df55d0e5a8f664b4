"""Accounting by sequence number: every item forwarded is delivered, dropped by a stage
(its marker came through instead), or lost (it never came out: a worker died with it).
A sequence number that was never sent is none of these: it was injected by someone else
(rogue), and it neither counts as loss nor moves the ledger on."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pystream_zmq.throttle import Throttled

log = logging.getLogger(__name__)

_MAX_LISTED = 1000  # lost ranges kept for the report; the count is always exact


class Ledger:
    """Fed by the sink in arrival order. In order (a chain, or replicas put back in order),
    a sequence number that skips ahead means the ones in between are gone. Out of order
    (replicas with ordered=False), a missing item is only known lost at the next drain.

    ``sent_below()``: no sequence number at or above it has been sent yet (the orchestrator
    knows; a standalone sink does not, and passes None)."""

    def __init__(
        self, *, in_order: bool = True, sent_below: Callable[[], int] | None = None
    ) -> None:
        self.in_order = in_order
        self._sent_below = sent_below
        self.next_seq = 0  # every item below has come out (or been counted lost)
        self._ahead: set[int] = set()  # out of order: arrived items above next_seq
        self.delivered = 0
        self.dropped = 0
        self.lost = 0
        self.rogue = 0  # arrivals with a sequence number never sent: not ours
        self.lost_ranges: list[tuple[int, int]] = []  # (first, last), inclusive
        self._warn_rogue = Throttled(
            log,
            logging.WARNING,
            "ignored an item with sequence number %d, which was never sent: someone else "
            "can send to this pipeline's sink",
        )
        self._warn_again = Throttled(
            log,
            logging.WARNING,
            "item %d arrived again, out of order, or after it was counted lost; not counted",
        )

    def arrived(self, seq: int, *, dropped: bool = False) -> bool:
        """Count one arrival; False when it is not counted (a rogue, or seen already)."""
        if self._sent_below is not None and seq >= self._sent_below():
            self.rogue += 1
            self._warn_rogue(seq)
            return False
        if seq < self.next_seq or seq in self._ahead:
            self._warn_again(seq)
            return False
        if self.in_order:
            self._lose_until(seq)
            self.next_seq = seq + 1
        else:
            self._ahead.add(seq)
            while self.next_seq in self._ahead:
                self._ahead.remove(self.next_seq)
                self.next_seq += 1
        if dropped:
            self.dropped += 1
        else:
            self.delivered += 1
        return True

    def settle(self, forwarded: int) -> None:
        """Everything below ``forwarded`` should have arrived by now (after a drain, or once
        the pipeline cannot go on): what has not is lost."""
        while self.next_seq < forwarded:
            gap_end = min([s for s in self._ahead if s > self.next_seq] + [forwarded])
            self._lose_until(gap_end)
            self.next_seq = gap_end
            while self.next_seq in self._ahead:
                self._ahead.remove(self.next_seq)
                self.next_seq += 1

    def _lose_until(self, seq: int) -> None:
        if seq <= self.next_seq:
            return
        first, last = self.next_seq, seq - 1
        self.lost += last - first + 1
        if len(self.lost_ranges) < _MAX_LISTED:
            self.lost_ranges.append((first, last))
        span = f"item {first}" if first == last else f"items {first}-{last}"
        log.warning("%s never came out of the pipeline (lost with a worker)", span)
