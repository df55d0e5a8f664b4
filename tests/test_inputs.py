"""The merge of several inputs (one per upstream replica), on real inproc sockets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from conftest import wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from pystream_zmq.errors import DecodeError
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


# -- batches (transport.KIND_BATCH): several one-frame messages in one ---------------------
def batch(*seqs: int, kind: int = DATA) -> bytes:
    return transport.pack_batch([transport.pack_envelope(kind, seq, 0.0) for seq in seqs])


@pytest.mark.parametrize("ordered", [True, False])
def test_a_batch_comes_out_as_its_messages(links, ordered: bool) -> None:  # type: ignore[no-untyped-def]
    senders, receivers = links
    inputs = Inputs(receivers, ordered=ordered)
    senders[0].send(batch(0, 3, 4, 7))
    senders[1].send(batch(1, 2, 5, 6))
    send(senders[2], DATA, 8)
    out = drain(inputs, 9)
    assert sorted(out) == [(DATA, seq) for seq in range(9)]
    if ordered:  # the merge takes each batch's messages as heads in turn
        assert out == [(DATA, seq) for seq in range(9)]


def test_an_ordered_stop_lets_go_of_the_rest_of_a_batch(links) -> None:  # type: ignore[no-untyped-def]
    senders, receivers = links
    inputs = Inputs(receivers, ordered=True)
    senders[1].send(batch(3, 4, 5))  # held: 0-2 may still come from the other inputs
    assert drain(inputs, 1, timeout=0.2) == []
    held, _ = inputs.let_go()
    assert [transport.unpack_envelope(m[0])[:2] for m in held] == [(DATA, 3), (DATA, 4), (DATA, 5)]


@pytest.mark.parametrize("ordered", [True, False])
def test_a_malformed_batch_is_handed_on_to_be_refused_and_nothing_else_is_lost(  # type: ignore[no-untyped-def]
    links, ordered: bool
) -> None:
    senders, receivers = links
    inputs = Inputs(receivers[:1], ordered=ordered)
    good = batch(0, 1)
    senders[0].send(good[:-3])  # cut inside its last message
    senders[0].send(good)
    out: list[Any] = []
    wait_until(lambda: bool(out.extend(inputs.take(inputs.wanted()))) or len(out) >= 3)
    with pytest.raises(DecodeError, match="a malformed batch"):
        transport.unpack_envelope(out[0][0])
    assert [transport.unpack_envelope(m[0])[:2] for m in out[1:]] == [(DATA, 0), (DATA, 1)]


def test_batches_round_trip_and_refuse_what_is_malformed() -> None:
    messages = [transport.pack_envelope(DATA, seq, 0.5) + b"x" * seq for seq in range(5)]
    packed = transport.pack_batch(messages)
    assert transport.is_batch([packed]) and not transport.is_batch([messages[0]])
    assert [bytes(m[0]) for m in transport.unpack_batch(packed)] == messages
    nested = transport.pack_batch([packed])
    envelope = len(transport.pack_envelope(DATA, 0, 0.0))
    miscounted = transport.pack_envelope(transport.KIND_BATCH, 6, 0.0) + packed[envelope:]
    short = transport.pack_batch([b"tiny"])
    for bad, reason in [
        (packed[:-1], "malformed message"),
        (packed + b"\x01", "inside a length"),
        (nested, "malformed message"),
        (miscounted, "says 6 messages and holds 5"),
        (short, "malformed message"),
    ]:
        with pytest.raises(DecodeError, match=reason):
            transport.unpack_batch(bad)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_after_a_batch_envelope_unpack_or_raise_decode_error(tail: bytes) -> None:
    frame = transport.pack_envelope(transport.KIND_BATCH, 2, 0.0) + tail
    try:
        messages = transport.unpack_batch(frame)
    except DecodeError:
        return
    assert len(messages) == 2


def test_more_waiting_says_whether_another_message_is_here_already(links) -> None:  # type: ignore[no-untyped-def]
    """What a worker asks before it holds an output back for a batch: never for the last
    message there is, which would only go later."""
    senders, receivers = links
    inputs = Inputs(receivers[:1])
    senders[0].send(batch(0, 1))
    send(senders[0], DATA, 2)
    assert wait_until(lambda: inputs.more_waiting())
    seen = []
    for message in inputs.take(receivers[:1]):
        seen.append((transport.unpack_envelope(message[0])[1], inputs.more_waiting()))
    assert seen == [(0, True), (1, True), (2, False)]
