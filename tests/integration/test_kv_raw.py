"""Raw layers (codec ``none``) sent straight from memory registered with the transport, as the connector
sends a hand-off and a migration's blocks: as few writes as they can, one after another on a slow link, and
as their block images; a block that changed hands on the wire fails the transfer."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import kv_transfer.exchange.outgoing as outgoing_module
from kv_transfer.codec import KVHeader, KVKind, get_codec
from kv_transfer.exchange.endpoint import KVEndpoint, TransferFailed
from kv_transfer.exchange.outgoing import RegisteredKV
from kv_transfer.vllm.paged import PagedLayout, block_images, block_spans
from protocol.transfers import TransferOutcome
from tests.support.kv import (
    DIM,
    HEADS,
    LAYERS,
    NOTHING_HELD,
    check_landed,
    kv_stack,
    open_transfer,
    send_registered,
    sent_over_slow_link,
    slow_pair,
    wait_early,
    wait_posted,
)


@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "together"])
def test_raw_layers_leave_in_as_few_writes_as_they_can(together: bool) -> None:
    """Sent from registered memory (codec none) one by one, the first layer goes at once and the layers
    queued while it travels leave in one write, not one each; sent together (a migration's blocks, all
    ready at once), they all leave in one write. Either way they land bit-exact."""
    name = f"merge-{together}"
    link, sender, receiver = slow_pair(name)
    try:
        layers = kv_stack(9)
        out = open_transfer(sender, receiver, name, "none")
        send_registered(sender, out, layers, together=together)
        assert len(link.posted) == 1  # one by one: the others wait for the first write
        finishing = threading.Thread(target=sender.finish, args=(out,))
        finishing.start()
        writes = 1 if together else 2
        for k in range(writes):
            deadline = time.monotonic() + 5
            while len(link.posted) <= k:
                assert time.monotonic() < deadline, "the queued layers were never posted"
                time.sleep(0.002)
            link.posted[k].land()
        finishing.join(timeout=5)
        assert not finishing.is_alive() and len(link.posted) == writes
        check_landed(receiver, name, layers)
    finally:
        sender.close()
        receiver.close()


def test_on_a_slow_link_layers_go_out_one_after_another_and_are_decoded_as_each_lands(monkeypatch) -> None:
    """Layers posted all at once would share the link and land together at the end; within the window
    (here one layer) each lands in turn, and the receiver decodes it while the next is on the wire."""
    monkeypatch.setattr(outgoing_module, "_WINDOW_BYTES", 1)
    link, sender, receiver, _, out = sent_over_slow_link("slow", "int8", 8)
    try:
        assert len(link.posted) == 1  # the others wait for the window
        finishing = threading.Thread(target=sender.finish, args=(out,))
        finishing.start()
        for landed in range(1, LAYERS + 1):
            link.posted[landed - 1].land()
            wait_early(receiver, "slow", landed)
            if landed < LAYERS:
                wait_posted(link, landed + 1)
        finishing.join(timeout=5)
        incoming = receiver.take("slow")
        assert incoming is not None
        assert [i for i, _, _ in receiver.decode_layers(incoming)] == list(range(LAYERS))
        receiver.release("slow", decode_s=0.0)
    finally:
        sender.close()
        receiver.close()


def _registered_send(sender: KVEndpoint, receiver: KVEndpoint, tid: str, layer, ids, before_commit=None):
    layout = PagedLayout.infer(layer, HEADS)
    sender.transport.register(layer)
    shape = (len(ids) * layout.block_size, HEADS, DIM)
    out = sender.open(
        tid,
        "req",
        receiver.address,
        layers=1,
        raw_bytes=2 * shape[0] * HEADS * DIM * 2,
        tokens=shape[0],
        codec=get_codec("none"),
    )
    halves = [
        RegisteredKV(KVHeader("none", kind, shape, torch.bfloat16), spans)
        for kind, spans in zip((KVKind.KEY, KVKind.VALUE), block_spans(layer, layout, ids), strict=True)
    ]
    sender.send_layer_from(out, 0, *halves)
    return sender.finish(out, before_commit=before_commit), layout


def test_blocks_sent_straight_from_registered_memory_land_as_their_block_images(pair) -> None:
    sender, receiver, fabric, _ = pair
    layer = torch.randn(10, HEADS, 16, 2 * DIM).to(torch.bfloat16)  # CPU layout, blocks of 16
    ids = [4, 1, 2, 8]
    moves = fabric.moves
    record, layout = _registered_send(sender, receiver, "zero-copy", layer, ids)
    assert record.outcome is TransferOutcome.SUCCESS and fabric.moves == moves + 1  # one write a layer
    landed = receiver.take("zero-copy")
    assert landed is not None
    ((_, first, second),) = receiver.decode_layers(landed)
    want = block_images(layer, layout, ids)
    assert torch.equal(first, want[0]) and torch.equal(second, want[1])
    receiver.release("zero-copy", decode_s=0.0)
    assert sender.held == receiver.held == NOTHING_HELD


def test_blocks_that_changed_hands_on_the_wire_fail_the_transfer_and_free_both_sides(pair) -> None:
    """The bytes are read while on the wire: a request preempted meanwhile may have lost its blocks, so
    the sender's check after the writes fails the transfer instead of committing garbage."""
    sender, receiver, _, _ = pair

    def preempted() -> None:
        raise ValueError("request req was preempted during the push")

    layer = torch.randn(10, HEADS, 16, 2 * DIM).to(torch.bfloat16)
    with pytest.raises(TransferFailed, match="preempted"):
        _registered_send(sender, receiver, "moved", layer, [0, 1], before_commit=preempted)
    assert receiver.take("moved") is None and receiver.gone("moved") is not None
    assert sender.held == receiver.held == NOTHING_HELD
