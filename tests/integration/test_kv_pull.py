"""Pulled transfers (a live migration's pre-copy stages): the receiver reads the sender's registered blocks
into its reservation; through the in-process transport (landing, pacing, refusals, the sender's check,
aborts mid-pull) and through real NIXL/UCX."""

from __future__ import annotations

import time

import pytest
import torch

from kv_transfer.exchange.endpoint import KVEndpoint, TransferFailed
from kv_transfer.transport.base import TransportError, XferState
from kv_transfer.transport.fake import FakeFabric, InProcessTransport
from kv_transfer.transport.side_channel import SideChannelClient, SideChannelError
from protocol.kv_ops import PullStatus
from protocol.transfers import TransferOutcome
from tests.support.kv import (
    LAYERS,
    NOTHING_HELD,
    check_landed,
    kv_stack,
    open_transfer,
    send_registered,
)


def _no_writes(endpoint: KVEndpoint) -> None:
    """Make any write the endpoint's transport posts fail the test: a pull's sender moves no byte."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the sender of a pulled transfer posted a write")

    endpoint.transport.write_from = refuse  # type: ignore[method-assign]
    endpoint.transport.write = refuse  # type: ignore[method-assign]


def _pulled(sender: KVEndpoint, receiver: KVEndpoint, tid: str, layers, rate=None, before_commit=None):
    out = open_transfer(sender, receiver, tid, "none")
    out.pull_at(rate)
    send_registered(sender, out, layers, together=True)
    return sender.finish(out, before_commit=before_commit)


def test_pulled_layers_land_exactly_and_the_sender_moves_no_byte(pair) -> None:
    sender, receiver, fabric, _ = pair
    _no_writes(sender)
    layers = kv_stack(3)
    moves = fabric.moves
    record = _pulled(sender, receiver, "pulled", layers)
    assert record.outcome is TransferOutcome.SUCCESS
    assert fabric.moves == moves + 1  # unpaced: every layer in one read
    check_landed(receiver, "pulled", layers)
    assert sender.held == NOTHING_HELD


def test_a_paced_pull_reads_layer_by_layer_at_the_rate() -> None:
    fabric = FakeFabric()
    sender = KVEndpoint(InProcessTransport("ps", 1 << 20, fabric))
    receiver = KVEndpoint(InProcessTransport("pd", 1 << 20, fabric))
    try:
        layers = kv_stack(4)
        nbytes = sum(layer.nbytes for layer in layers)
        moves, started = fabric.moves, time.monotonic()
        record = _pulled(sender, receiver, "paced", layers, rate=nbytes / 0.3)  # 0.3 s for all of it
        took = time.monotonic() - started
        assert record.outcome is TransferOutcome.SUCCESS
        assert fabric.moves == moves + LAYERS  # one read per layer
        assert took >= 0.3 * (LAYERS - 1) / LAYERS  # the last layer's share goes once the others went
        check_landed(receiver, "paced", layers)
    finally:
        sender.close()
        receiver.close()


def test_blocks_that_changed_hands_during_the_pull_fail_it_and_free_both_sides(pair) -> None:
    sender, receiver, _, _ = pair

    def preempted() -> None:
        raise ValueError("request req was preempted during the pull")

    with pytest.raises(TransferFailed, match="preempted"):
        _pulled(sender, receiver, "moved", kv_stack(5), before_commit=preempted)
    assert receiver.take("moved") is None and receiver.gone("moved") is not None
    assert sender.held == receiver.held == NOTHING_HELD


def test_a_pull_outside_its_reservation_or_without_one_is_refused(pair) -> None:
    sender, receiver, _, _ = pair
    layers = kv_stack(6)
    out = open_transfer(sender, receiver, "bounded", "none")
    for layer in layers:
        sender.transport.register(layer)
    client = SideChannelClient(receiver.address)
    try:
        past = out.remote_offset + (4 << 20)
        ask = {"op": "pull", "peer": "p", "rate": None}
        with pytest.raises(SideChannelError, match="leave its reservation"):
            client.call(
                {**ask, "transfer_id": "bounded", "slots": [[[layers[0].data_ptr(), past, 64]]]}, timeout_s=5
            )
        with pytest.raises(SideChannelError, match="no reservation"):
            client.call(
                {**ask, "transfer_id": "never", "slots": [[[layers[0].data_ptr(), 0, 64]]]}, timeout_s=5
            )
    finally:
        client.close()
    sender.abort(out, "test over")
    assert sender.held == receiver.held == NOTHING_HELD


def test_a_pull_that_fails_on_the_receiver_fails_the_transfer_with_its_reason(pair) -> None:
    sender, receiver, _, _ = pair
    out = open_transfer(sender, receiver, "unregistered", "none")
    out.pull_at(None)
    layers = kv_stack(7)
    send_registered(sender, out, layers, together=True)
    sender.transport._sources.clear()  # as if the sender's KV cache were not registered after all
    with pytest.raises(TransferFailed, match="not registered memory"):
        sender.finish(out)
    assert sender.held == receiver.held == NOTHING_HELD


def test_a_sender_that_gives_up_stops_the_pull_before_the_region_is_freed() -> None:
    """A pull slower than the sender's deadline: the sender's abort stops the reads (they do not run on
    into a region freed for someone else) and frees both sides, without waiting out the pacing."""
    fabric = FakeFabric()
    sender = KVEndpoint(InProcessTransport("gs", 1 << 20, fabric), timeout_s=0.3)
    receiver = KVEndpoint(InProcessTransport("gd", 1 << 20, fabric))
    try:
        layers = kv_stack(8)
        moves, started = fabric.moves, time.monotonic()
        with pytest.raises(TransferFailed, match="did not pull"):
            _pulled(sender, receiver, "slow", layers, rate=layers[0].nbytes / 10)  # 10 s a layer
        assert time.monotonic() - started < 3
        # the receiver stopped the pull (and waited for its thread) before it answered the sender's abort
        assert receiver.held == sender.held == NOTHING_HELD
        assert fabric.moves == moves + 1  # the first layer went at once; the others never did
    finally:
        sender.close()
        receiver.close()


def test_over_real_nixl_a_pull_reads_registered_tensors_bit_exact() -> None:
    """NIXL READ from the sender's registered KV tensors (not its staging buffer), named in the agent
    metadata that the reservation's handshake carried, into the receiver's staging; and a read of memory the
    sender never registered fails with a clear error rather than landing garbage."""
    from kv_transfer.transport.nixl import NixlTransport

    sender_transport = NixlTransport("it-pull-s", 4 << 20)
    layers = kv_stack(11)
    for layer in layers:  # registered before any handshake, as the connector does
        sender_transport.register(layer)
    sender = KVEndpoint(sender_transport, timeout_s=10)
    receiver = KVEndpoint(NixlTransport("it-pull-d", 4 << 20), timeout_s=10)
    try:
        _no_writes(sender)
        assert _pulled(sender, receiver, "nixl-pull", layers).outcome is TransferOutcome.SUCCESS
        check_landed(receiver, "nixl-pull", layers)
        assert _pulled(sender, receiver, "nixl-paced", layers, rate=50e6).outcome is TransferOutcome.SUCCESS
        check_landed(receiver, "nixl-paced", layers)
        stray = torch.ones(64, dtype=torch.uint8)
        with pytest.raises(TransportError, match="READ to it-pull-s failed to post"):
            receiver.transport.read_into("it-pull-s", [(stray.data_ptr(), 0, 64)]).state()
    finally:
        sender.close()
        receiver.close()


class _Pending:
    def state(self) -> XferState:
        return XferState.PENDING

    def release(self) -> None:
        return None


class _DeadSender(InProcessTransport):
    """A receiver's transport whose reads never end, as from a sender whose process died mid-pull."""

    def read_into(self, peer: str, spans: list[tuple[int, int, int]]) -> _Pending:  # type: ignore[override]
        return _Pending()


def test_a_read_that_never_ends_does_not_hold_up_the_abort() -> None:
    fabric = FakeFabric()
    sender = KVEndpoint(InProcessTransport("ds", 1 << 20, fabric), timeout_s=0.3)
    receiver = KVEndpoint(_DeadSender("dd", 1 << 20, fabric))
    try:
        started = time.monotonic()
        with pytest.raises(TransferFailed, match="did not pull"):
            _pulled(sender, receiver, "dead", kv_stack(9))
        assert time.monotonic() - started < 4  # the sender's 0.3 s, then the receiver's grace for the read
        assert receiver.held == sender.held == NOTHING_HELD
    finally:
        sender.close()
        receiver.close()


def _counting(endpoint: KVEndpoint, op: type) -> list[int]:
    """Count the side-channel requests ``op`` that ``endpoint`` serves."""
    calls, handler = [0], endpoint._handlers[op]

    def counted(msg):
        calls[0] += 1
        return handler(msg)

    endpoint.add_op(op, counted)
    return calls


def test_a_paced_pull_is_asked_about_only_once_it_can_have_ended() -> None:
    """Each ``pull_status`` costs both sides a round trip on the cores the engines compute on: a paced pull
    cannot end before its last layer starts, so the sender waits that long before it asks."""
    fabric = FakeFabric()
    sender = KVEndpoint(InProcessTransport("qs", 1 << 20, fabric))
    receiver = KVEndpoint(InProcessTransport("qd", 1 << 20, fabric))
    try:
        asked = _counting(receiver, PullStatus)
        layers = kv_stack(4)
        record = _pulled(sender, receiver, "asked", layers, rate=sum(x.nbytes for x in layers) / 0.4)
        assert record.outcome is TransferOutcome.SUCCESS
        check_landed(receiver, "asked", layers)
        assert 1 <= asked[0] <= 10  # polled from the start with back-off: 43
    finally:
        sender.close()
        receiver.close()


def test_a_reservation_for_raw_layers_leaves_the_receiver_s_decoding_thread_asleep(pair) -> None:
    """Only a compressed layer's write comes with a notification to decode early; a reservation for raw ones
    (a migration's pre-copy stage, held for seconds) must not have the receiver poll for notifications. While
    a second receiver, expecting int8 layers, polls 30 times (every millisecond or so), the first, holding a
    raw reservation, looks once when it is reserved and then at most every half second."""
    sender, raw_receiver, fabric, _ = pair
    int8_receiver = KVEndpoint(InProcessTransport("d2", 1 << 20, fabric), lease_s=10)
    try:
        polls = {"raw": _count_polls(raw_receiver), "int8": _count_polls(int8_receiver)}
        woken = polls["raw"][0]
        raw = open_transfer(sender, raw_receiver, "raw", "none")
        _wait_until(lambda: polls["raw"][0] > woken, "the decoding thread to wake for the raw reservation")
        awake, started = polls["raw"][0], time.monotonic()
        compressed = open_transfer(sender, int8_receiver, "int8", "int8")
        _wait_until(lambda: polls["int8"][0] >= 30, "30 polls while int8 layers may come")
        elapsed = time.monotonic() - started
        assert polls["raw"][0] - awake <= 1 + elapsed / 0.5, (polls, elapsed)
        sender.abort(raw, "test over")
        sender.abort(compressed, "test over")
    finally:
        int8_receiver.close()


def _count_polls(receiver: KVEndpoint) -> list[int]:
    """Count the receiver's polls for NIXL notifications (its early-decoding thread's)."""
    polls, notifications = [0], receiver.transport.notifications

    def counted() -> list[bytes]:
        polls[0] += 1
        return notifications()

    receiver.transport.notifications = counted  # type: ignore[method-assign]
    return polls


def _wait_until(cond, what: str, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"waited {timeout_s:g} s for {what}"
        time.sleep(0.001)
