"""Small layers handed over together travel in groups (one slot, side by side along the heads axis) and
decode as if sent alone; a compressed transfer keeps two writes on the wire. Two KV endpoints on loopback
side channels, through the in-process transport, as in ``test_kv_endpoint``."""

from __future__ import annotations

import threading

import pytest
import torch

from kv_transfer.exchange.endpoint import KVEndpoint
from kv_transfer.transport.fake import InProcessTransport
from tests.support.kv import (
    DIM,
    HEADS,
    LAYERS,
    NOTHING_HELD,
    TOKENS,
    check_landed,
    make_layers,
    open_transfer,
    sent_over_slow_link,
    wait_early,
    wait_posted,
)


@pytest.mark.parametrize("codec", ["lossless", "fp8", "int8", "int4"])
def test_small_layers_handed_over_travel_in_groups_and_land_as_if_sent_alone(pair, codec: str) -> None:
    """Layers the caller hands over (``hold``) go in groups: the first and the last two alone, the ones
    between in one slot (small layers: few codec calls and writes). The receiver gets every layer, in order,
    bit for bit what the same layers sent one by one decode to (and, for a fixed-size code, the same bytes
    on the wire)."""
    sender, receiver, _, _ = pair
    layers = make_layers(11, count=7)
    alone, grouped = (open_transfer(sender, receiver, tid, codec, layers=7) for tid in ("alone", "grouped"))
    for i, (k, v) in enumerate(layers):
        sender.send_layer(alone, i, k, v)
        sender.send_layer(grouped, i, k, v, hold=True)
    records = sender.finish(alone), sender.finish(grouped)
    assert records[0].raw_bytes == records[1].raw_bytes
    if codec != "lossless":  # an entropy coder's output depends on what it is given at once
        assert records[0].wire_bytes == records[1].wire_bytes
    got = {}
    for tid in ("alone", "grouped"):
        incoming = receiver.take(tid)
        assert incoming is not None
        got[tid] = [(i, k.clone(), v.clone()) for i, k, v in receiver.decode_layers(incoming)]
        slots = incoming.manifest["slots"]
        receiver.release(tid, decode_s=0.0)
    assert [(s["index"], s.get("layers", 1)) for s in slots] == [(0, 1), (1, 4), (5, 1), (6, 1)]
    assert [i for i, _, _ in got["grouped"]] == list(range(7))
    for (_, k, v), (_, k1, v1) in zip(got["grouped"], got["alone"], strict=True):
        assert k.shape == (TOKENS, HEADS, DIM) and torch.equal(k, k1) and torch.equal(v, v1)
    assert receiver.held == NOTHING_HELD


def test_a_held_group_is_decoded_early_and_counted_in_layers(pair) -> None:
    """A group's slot is decoded on landing like a single layer's; ``early_layers`` counts its layers."""
    sender, receiver, _, _ = pair
    layers = make_layers(12, count=7)
    out = open_transfer(sender, receiver, "held", "int8", layers=7)
    for i, (k, v) in enumerate(layers[:5]):
        sender.send_layer(out, i, k, v, hold=True)
    wait_early(receiver, "held", 1)  # the first layer went alone; the next four are still held
    assert receiver.early_layers("held") == 1
    sender.send_layer(out, 5, *layers[5], hold=True)  # goes alone: the group of four leaves before it
    wait_early(receiver, "held", 6)
    sender.send_layer(out, 6, *layers[6], hold=True)
    wait_early(receiver, "held", 7)
    sender.finish(out)
    landed = receiver.take("held")
    assert landed is not None
    receiver.transport.buffer.zero_()  # the load only collects what was decoded early
    assert [i for i, _, _ in receiver.decode_layers(landed)] == list(range(7))
    receiver.release("held", decode_s=0.0)


def test_a_held_layer_the_codec_rejects_fails_when_its_group_leaves(pair) -> None:
    """A held layer is encoded when its group leaves (here before a layer that goes alone): a value the
    codec cannot take fails that call, clearly, and the caller's abort frees both sides, as the connector
    does."""
    sender, receiver, _, _ = pair
    layers = make_layers(13, count=7)
    layers[1][0][3, 1, 5] = float("inf")
    out = open_transfer(sender, receiver, "bad", "int8", layers=7)
    for i, (k, v) in enumerate(layers[:5]):
        sender.send_layer(out, i, k, v, hold=True)
    with pytest.raises(ValueError, match="int8: kv contains inf or NaN"):
        sender.send_layer(out, 5, *layers[5], hold=True)
    sender.abort(out, "layer 1 cannot be encoded")
    assert sender.held == receiver.held == NOTHING_HELD


@pytest.mark.parametrize("layers", [0, "2", 5])
def test_a_slot_with_a_bad_layer_count_is_refused_at_load(pair, request, layers: object) -> None:
    sender, _, fabric, _ = pair
    # no early decoding: every slot is decoded at the load, from its manifest
    receiver = KVEndpoint(InProcessTransport("d-late", 1 << 20, fabric), lease_s=10, predecode_bytes=0)
    request.addfinalizer(receiver.close)
    out = open_transfer(sender, receiver, "count", "int8", layers=7)
    for i, (k, v) in enumerate(make_layers(14, count=7)):
        sender.send_layer(out, i, k, v, hold=True)
    sender.finish(out)
    landed = receiver.take("count")
    assert landed is not None
    assert landed.manifest["slots"][1]["layers"] == 4
    landed.manifest["slots"][1]["layers"] = layers
    with pytest.raises(ValueError, match=r"layer count must be a positive int|do not split heads"):
        list(receiver.decode_layers(landed))
    receiver.release("count", error="bad slot")


def test_compressed_layers_are_on_the_wire_two_at_a_time() -> None:
    """However small its layers, a compressed transfer has at most two writes on the wire: one travelling,
    one queued behind it. With more, UCX shares the link among them, they all land near the end, and
    the receiver cannot decode any early (SmolLM2, 512 tokens, int8 on 1 Gbit/s: half the layers were still
    undecoded at the commit; two at a time, each group was decoded as it landed)."""
    link, sender, receiver, layers, out = sent_over_slow_link("two", "lossless", 15)
    try:
        assert len(link.posted) == 2
        link.posted[0].land()
        finishing = threading.Thread(target=sender.finish, args=(out,))
        finishing.start()
        wait_posted(link, 3)
        assert len(link.posted) == 3  # one landed, one more posted: still two on the wire
        for xfer in link.posted[1:]:
            xfer.land()
        wait_posted(link, LAYERS)
        link.posted[-1].land()
        finishing.join(timeout=5)
        assert not finishing.is_alive()
        check_landed(receiver, "two", layers)
    finally:
        sender.close()
        receiver.close()
