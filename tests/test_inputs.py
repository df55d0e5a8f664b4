"""The merge of several inputs (one per upstream replica), on real inproc sockets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from conftest import wait_until

from pystream_zmq.wire import transport
from pystream_zmq.wire.inputs import Inputs


@pytest.fixture
def links() -> Iterator[tuple[list[zmq.Socket[Any]], list[zmq.Socket[Any]]]]:
    """Three (sender, receiver) pairs."""
    ctx: zmq.Context[Any] = zmq.Context()
    senders, receivers = [], []
    for i in range(3):
        receivers.append(ctx.socket(zmq.PULL))
        receivers[-1].bind(f"inproc://merge-{i}")
        senders.append(ctx.socket(zmq.PUSH))
        senders[-1].connect(f"inproc://merge-{i}")
    yield senders, receivers
    ctx.destroy(linger=0)


def send(sock: zmq.Socket[Any], kind: int, seq: int) -> None:
    sock.send(transport.pack_envelope(kind, seq, 0.0))


def drain(inputs: Inputs, expect: int, timeout: float = 5) -> list[tuple[int, int]]:
    """(kind, seq) of what comes out, until ``expect`` messages did (or ``timeout``)."""
    out: list[tuple[int, int]] = []

    def done() -> bool:
        ready = [s for s in inputs.wanted() if s.poll(0)]
        for message in inputs.take(ready):
            kind, seq, _ = transport.unpack_envelope(message[0])
            out.append((kind, seq))
        return len(out) >= expect

    wait_until(done, timeout=timeout)
    return out


DATA, EOS = transport.KIND_DATA, transport.KIND_EOS


def test_ordered_merge_puts_items_back_in_sequence(links) -> None:  # type: ignore[no-untyped-def]
    senders, receivers = links
    for seq in (1, 4, 7):
        send(senders[1], DATA, seq)
    for seq in (2, 5):
        send(senders[2], DATA, seq)
    for seq in (0, 3, 6):
        send(senders[0], DATA, seq)
    inputs = Inputs(receivers, ordered=True)
    assert drain(inputs, 8) == [(DATA, seq) for seq in range(8)]


def test_a_missing_item_is_skipped_once_every_input_has_a_later_one(links) -> None:  # type: ignore[no-untyped-def]
    senders, receivers = links
    inputs = Inputs(receivers, ordered=True)
    send(senders[0], DATA, 0)
    send(senders[1], DATA, 2)  # 1 died with replica 2
    assert drain(inputs, 1) == [(DATA, 0)]
    assert drain(inputs, 1, timeout=0.2) == []  # 1 may still come from input 2
    send(senders[2], DATA, 3)
    assert drain(inputs, 1, timeout=0.2) == []  # ... or from input 0
    send(senders[0], DATA, 4)
    assert drain(inputs, 3) == [(DATA, 2), (DATA, 3), (DATA, 4)]
    assert inputs.skipped == 1
    send(senders[2], DATA, 1)  # it turned up after all: too late, discarded and counted
    assert drain(inputs, 1, timeout=0.2) == [] and inputs.late == 1


def test_the_wait_for_a_missing_item_is_bounded(links) -> None:  # type: ignore[no-untyped-def]
    senders, receivers = links
    inputs = Inputs(receivers, ordered=True, reorder_timeout=0.2)
    send(senders[0], DATA, 1)  # 0 is lost, and the other inputs stay quiet
    assert inputs.poll_ms(100) == 100
    assert drain(inputs, 1) == [(DATA, 1)]
    assert inputs.skipped == 1


def test_end_of_stream_passes_once_every_input_delivered_it(links) -> None:  # type: ignore[no-untyped-def]
    senders, receivers = links
    for ordered in (True, False):
        inputs = Inputs(receivers, ordered=ordered)
        base = 0 if ordered else 10
        send(senders[0], DATA, base)
        send(senders[0], EOS, 7)
        send(senders[1], EOS, 7)
        assert drain(inputs, 1) == [(DATA, base)]
        assert drain(inputs, 1, timeout=0.2) == []  # input 2 has still to end its stream
        send(senders[2], DATA, base + 1)
        send(senders[2], EOS, 7)
        assert drain(inputs, 2) == [(DATA, base + 1), (EOS, 7)]


@pytest.mark.parametrize("ordered", [True, False])
def test_a_stop_lets_go_of_what_the_merge_holds(links, ordered: bool) -> None:  # type: ignore[no-untyped-def]
    """What a receiver that stops early must count: the items held back for the merge, and
    which inputs have already ended their stream."""
    senders, receivers = links
    inputs = Inputs(receivers, ordered=ordered)
    send(senders[0], EOS, 1)
    send(senders[2], DATA, 5)  # held (ordered): 0-4 may still come from the other inputs
    if not ordered:
        assert drain(inputs, 1) == [(DATA, 5)]  # nothing held back, the marker is
    else:
        assert drain(inputs, 1, timeout=0.2) == []
    held, ended = inputs.let_go()
    assert ended == {0}
    assert [transport.unpack_envelope(m[0])[:2] for m in held] == ([(DATA, 5)] if ordered else [])
    assert inputs.let_go() == ([], {0})  # taken once; the marker stays received
