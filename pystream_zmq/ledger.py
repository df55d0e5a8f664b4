"""Accounting by sequence number: every item forwarded is delivered, dropped by a stage
(its marker came through instead), or lost (it never came out: a worker died with it)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_MAX_LISTED = 1000  # lost ranges kept for the report; the count is always exact


class Ledger:
    """Fed by the sink in arrival order. A chain keeps order, so a sequence number that
    skips ahead means the ones in between are gone."""

    def __init__(self) -> None:
        self.next_seq = 0
        self.delivered = 0
        self.dropped = 0
        self.lost = 0
        self.lost_ranges: list[tuple[int, int]] = []  # (first, last), inclusive

    def arrived(self, seq: int, *, dropped: bool = False) -> None:
        if seq < self.next_seq:
            log.warning("item %d arrived again or out of order; not counted", seq)
            return
        self._lose_until(seq)
        self.next_seq = seq + 1
        if dropped:
            self.dropped += 1
        else:
            self.delivered += 1

    def settle(self, forwarded: int) -> None:
        """Everything below ``forwarded`` should have arrived by now (after a drain)."""
        self._lose_until(forwarded)
        self.next_seq = max(self.next_seq, forwarded)

    def _lose_until(self, seq: int) -> None:
        if seq <= self.next_seq:
            return
        first, last = self.next_seq, seq - 1
        self.lost += last - first + 1
        if len(self.lost_ranges) < _MAX_LISTED:
            self.lost_ranges.append((first, last))
        span = f"item {first}" if first == last else f"items {first}-{last}"
        log.warning("%s never came out of the pipeline (lost with a worker)", span)
