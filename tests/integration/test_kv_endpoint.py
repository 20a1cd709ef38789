"""Two KV endpoints on loopback side channels, moving layers through the in-process transport: every codec,
early decoding, checksum retry, failure and lease paths. (Raw layers sent from registered memory:
``test_kv_raw.py``; real NIXL: ``test_kv_nixl.py``.)"""

from __future__ import annotations

import time

import pytest
import torch

from kv_transfer.codec import get_codec
from kv_transfer.exchange.endpoint import KVEndpoint, TransferFailed
from kv_transfer.exchange.sender import STALLED_PEER_S
from kv_transfer.transport.fake import InProcessTransport
from protocol.transfers import TransferOutcome
from tests.support.kv import (
    DIM,
    HEADS,
    LAYERS,
    NOTHING_HELD,
    TOKENS,
    make_layers,
    open_transfer,
    send,
    wait_early,
)


@pytest.mark.parametrize("codec", ["none", "lossless", "fp8", "int8", "int4"])
def test_layers_arrive_decoded_and_everything_is_freed(pair, codec: str) -> None:
    sender, receiver, _, _ = pair
    layers = make_layers()
    tid = send(sender, receiver, codec, layers)
    landed = receiver.take(tid)
    assert landed is not None and landed.tokens == TOKENS
    got = list(receiver.decode_layers(landed))
    assert [i for i, _, _ in got] == list(range(LAYERS))
    for (_, k, v), (k0, v0) in zip(got, layers, strict=True):
        if codec in ("none", "lossless"):
            assert torch.equal(k, k0) and torch.equal(v, v0)
        else:
            tol = 0.35 if codec == "int4" else 0.08
            assert (k.float() - k0.float()).abs().max() < tol * k0.float().abs().max()
    receiver.release(tid, decode_s=0.01)
    (record,) = receiver.drain_records()
    assert record.outcome is TransferOutcome.SUCCESS and record.codec == codec and record.decode_s >= 0.01
    assert sender.drain_records() == []
    assert sender.held == receiver.held == NOTHING_HELD


def test_compressed_layers_are_decoded_while_later_ones_are_on_the_way(pair) -> None:
    """The receiver decodes each layer as it lands, before the sender finishes: the load only collects
    them (here the staging bytes are wiped after the commit, and the load still gets every value)."""
    sender, receiver, _, _ = pair
    layers = make_layers(5)
    out = open_transfer(sender, receiver, "early", "lossless")
    for i, (k, v) in enumerate(layers[:-1]):
        sender.send_layer(out, i, k, v)
    wait_early(receiver, "early", LAYERS - 1)
    sender.send_layer(out, LAYERS - 1, *layers[-1])
    wait_early(receiver, "early", LAYERS)
    sender.finish(out)
    landed = receiver.take("early")
    assert landed is not None
    receiver.transport.buffer.zero_()
    for (_, k, v), (k0, v0) in zip(receiver.decode_layers(landed), layers, strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    receiver.release("early", decode_s=0.0)
    (record,) = receiver.drain_records()
    assert record.decode_s > 0  # the early decoding is counted
    assert receiver.held == NOTHING_HELD


def test_layers_over_the_decoding_budget_or_corrupt_are_decoded_at_load(pair) -> None:
    sender, _, fabric, clock = pair
    tight = KVEndpoint(InProcessTransport("d2", 1 << 20, fabric), clock=clock, lease_s=10, predecode_bytes=1)
    try:
        layers = make_layers(6)
        fabric.corrupt_writes = 1
        tid = send(sender, tight, "int8", layers)
        landed = tight.take(tid)
        assert landed is not None and landed.manifest["retries"] == 1 and tight.early_layers(tid) == 0
        got = [k for _, k, _ in tight.decode_layers(landed)]
        assert all((k.float() - k0.float()).abs().max() < 0.1 for k, (k0, _) in zip(got, layers, strict=True))
        tight.release(tid, decode_s=0.0)
        assert tight.held == NOTHING_HELD
    finally:
        tight.close()


def test_an_aborted_transfer_frees_its_early_decoded_layers(pair) -> None:
    sender, receiver, _, _ = pair
    out = _one_layer_sent(sender, receiver, "gone", "int4")
    wait_early(receiver, "gone", 1)
    sender.abort(out, "client left")
    assert sender.held == receiver.held == NOTHING_HELD


def test_a_layer_corrupted_once_is_sent_again(pair) -> None:
    sender, receiver, fabric, _ = pair
    fabric.corrupt_writes = 1
    layers = make_layers(1)
    tid = send(sender, receiver, "none", layers)
    landed = receiver.take(tid)
    assert landed is not None and landed.manifest["retries"] == 1
    for (_, k, v), (k0, v0) in zip(receiver.decode_layers(landed), layers, strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)
    receiver.release(tid, decode_s=0.0)


def _one_layer_sent(sender: KVEndpoint, receiver: KVEndpoint, tid: str, codec: str):
    out = sender.open(
        tid,
        "req",
        receiver.address,
        layers=1,
        raw_bytes=2 * TOKENS * HEADS * DIM * 2,
        tokens=TOKENS,
        codec=get_codec(codec),
    )
    k, v = make_layers()[0]
    sender.send_layer(out, 0, k, v)
    return out


def test_corrupted_twice_fails_with_a_clear_error_and_frees_both_sides(pair) -> None:
    sender, receiver, fabric, _ = pair
    fabric.corrupt_writes = 2
    out = _one_layer_sent(sender, receiver, "bad", "none")
    with pytest.raises(TransferFailed, match="corrupt twice"):
        sender.finish(out)
    (record,) = sender.drain_records()
    assert record.outcome is TransferOutcome.FAILED and "checksum" in record.error
    assert receiver.drain_records() == []  # one record per transfer: the sender's
    assert sender.held == receiver.held == NOTHING_HELD


def test_a_failed_write_fails_the_transfer(pair) -> None:
    sender, receiver, fabric, _ = pair
    fabric.fail_writes = 1
    out = _one_layer_sent(sender, receiver, "w", "int8")
    with pytest.raises(TransferFailed, match="write of layer 0"):
        sender.finish(out)
    assert sender.held == receiver.held == NOTHING_HELD


def test_an_unloaded_transfer_expires_aborted(pair) -> None:
    sender, receiver, _, clock = pair
    tid = send(sender, receiver, "int4", make_layers())
    clock.now += 11
    assert receiver.take(tid) is None
    (record,) = receiver.drain_records()
    assert record.outcome is TransferOutcome.ABORTED and "lease expired" in record.error
    assert receiver.held["regions"] == 0


def test_an_idle_receiver_still_frees_a_lapsed_transfer(pair) -> None:
    """Nobody calls ``take`` on an idle engine (a client left right after a migration's hand-over): the
    leak check and the next reservation end lapsed transfers themselves."""
    sender, receiver, _, clock = pair
    send(sender, receiver, "none", make_layers())
    assert receiver.held == {"regions": 1, "landed": 1, "reserved": 0, "predecoded": 0, "pulls": 0}
    clock.now += 11
    assert receiver.held == NOTHING_HELD
    (record,) = receiver.drain_records()
    assert record.outcome is TransferOutcome.ABORTED and "lease expired" in record.error


def test_renewed_kv_outlives_its_lease_while_the_request_waits(pair) -> None:
    """A decode request queued behind a full batch for longer than the lease keeps its landed KV as long as
    its engine renews it; once renewals stop, the lease frees it."""
    sender, receiver, _, clock = pair
    layers = make_layers(3)
    tid = send(sender, receiver, "none", layers)
    for _ in range(5):  # 20 s queued, lease 10 s
        clock.now += 4
        assert receiver.renew([tid, "never-sent"]) == ["never-sent"]
    incoming = receiver.take(tid)
    assert incoming is not None
    for (k, v), (index, k2, v2) in zip(layers, receiver.decode_layers(incoming), strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2), index
    clock.now += 11
    assert receiver.take(tid) is None and receiver.renew([tid]) == [tid]
    assert receiver.held["regions"] == 0


def test_an_unreachable_receiver_fails_fast(pair) -> None:
    sender, _, _, _ = pair
    with pytest.raises(TransferFailed, match="no reply"):
        sender.open("x", "req", "127.0.0.1:9", layers=1, raw_bytes=100, tokens=1, codec=get_codec("none"))
    assert sender.held["regions"] == 0


def test_a_receiver_that_missed_a_deadline_is_not_waited_for_again_for_a_while(pair) -> None:
    """A stopped decode worker once held up every prefill step with a hand-off to it for a whole deadline
    each (and every request batched with them). After one miss, transfers to it fail at once for
    ``STALLED_PEER_S``; other receivers are not affected."""
    _, receiver, fabric, clock = pair
    sender = KVEndpoint(InProcessTransport("p2", 1 << 20, fabric), clock=clock, timeout_s=0.3)

    def attempt() -> tuple[float, str]:
        started = time.monotonic()
        with pytest.raises(TransferFailed) as failed:
            sender.open("x", "req", "127.0.0.1:9", layers=1, raw_bytes=100, tokens=1, codec=get_codec("none"))
        return time.monotonic() - started, str(failed.value)

    try:
        waited, why = attempt()
        assert waited >= 0.3 and "no reply" in why
        waited, why = attempt()
        assert waited < 0.25 and "missed a deadline" in why
        tid = send(sender, receiver, "none", make_layers(3))  # another receiver: as ever
        assert receiver.take(tid) is not None
        clock.now += STALLED_PEER_S
        waited, why = attempt()
        assert waited >= 0.3 and "no reply" in why, "asked again once the pause is over"
    finally:
        sender.close()


def test_a_link_probe_is_no_transfer_on_either_side(pair) -> None:
    """The codec chooser's bandwidth probes leave no transfer record, measured or failed: the engines'
    transfer figures (and the dashboards' failure lines) count hand-offs and migrations only."""
    sender, receiver, _, _ = pair
    assert sender.probe(receiver.address, nbytes=4096) > 0
    with pytest.raises(TransferFailed):
        sender.probe("127.0.0.1:9", nbytes=4096)
    assert [r.outcome for r in sender.drain_records()] == []
    assert TransferOutcome.FAILED not in [r.outcome for r in receiver.drain_records()]
    assert sender.held["regions"] == 0 and receiver.held["regions"] == 0


def test_a_receiver_knows_which_transfers_will_never_land(pair) -> None:
    """A load waiting for a part still on its way (a migration's last stage) must learn at once when the
    sender dropped it, or when it lapsed, rather than wait out its deadline; a loaded transfer is not gone."""
    sender, receiver, _, clock = pair
    assert receiver.gone("on-its-way") is None
    sender.drop_remote(receiver.address, ["on-its-way"], "the source failed")
    assert receiver.gone("on-its-way") == "the source failed"
    lapsing = send(sender, receiver, "none", make_layers())
    loaded = send(sender, receiver, "none", make_layers())
    assert receiver.gone(lapsing) is None and receiver.take(loaded) is not None
    receiver.release(loaded, decode_s=0.01)
    clock.now += 11
    assert receiver.take(lapsing) is None
    assert "lease expired" in (receiver.gone(lapsing) or "")
    assert receiver.gone(loaded) is None


def test_malformed_side_channel_messages_are_answered_or_dropped_and_transfers_go_on(pair) -> None:
    """One bad frame used to end the receiver's side-channel thread: the worker still said READY and every
    hand-off to it then timed out."""
    import json as _json

    import zmq

    sender, receiver, _, _ = pair
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{receiver.address}")
    try:
        bad = [
            [b"only one frame"],
            [b"", b"x", b"a tag", b"four frames after the identity"],
            [b"not empty", b"{}"],  # no REQ envelope
            [b"", b"not json"],
            [b"", b"[1, 2, 3]"],
            [b"", _json.dumps({"op": "reserve"}).encode()],  # fields missing
            [b"", _json.dumps({"op": "teleport", "x": 1}).encode()],
            [b"", b"\xff\xfe\x00"],
        ]
        answered = 0
        for frames in bad:
            sock.send_multipart(frames)
        while sock.poll(500):  # the well-formed envelopes get an error reply; the others are dropped
            (_, reply) = sock.recv_multipart()
            assert _json.loads(reply)["ok"] is False
            answered += 1
        assert answered == 5, answered
    finally:
        sock.close()
    tid = send(sender, receiver, "int8", make_layers())  # the receiver still serves
    assert receiver.take(tid) is not None
