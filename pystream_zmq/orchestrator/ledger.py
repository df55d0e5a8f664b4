"""Accounting by sequence number: every item forwarded is delivered, dropped by a stage
(its marker came through instead), or lost (it never came out: a worker died with it)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_MAX_LISTED = 1000  # lost ranges kept for the report; the count is always exact


class Ledger:
    """Fed by the sink in arrival order. In order (a chain, or replicas put back in order),
    a sequence number that skips ahead means the ones in between are gone. Out of order
    (replicas with ordered=False), a missing item is only known lost at the next drain."""

    def __init__(self, *, in_order: bool = True) -> None:
        self.in_order = in_order
        self.next_seq = 0  # every item below has come out (or been counted lost)
        self._ahead: set[int] = set()  # out of order: arrived items above next_seq
        self.delivered = 0
        self.dropped = 0
        self.lost = 0
        self.lost_ranges: list[tuple[int, int]] = []  # (first, last), inclusive

    def arrived(self, seq: int, *, dropped: bool = False) -> None:
        if seq < self.next_seq or seq in self._ahead:
            log.warning("item %d arrived again or out of order; not counted", seq)
            return
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

    def settle(self, forwarded: int) -> None:
        """Everything below ``forwarded`` should have arrived by now (after a drain)."""
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
