"""Two KV endpoints on loopback side channels, moving layers through the in-process transport (every codec,
checksum retry, failure, lease and early-decoding paths), and early decoding through real NIXL/UCX."""

from __future__ import annotations

import itertools
import os
import threading
import time

import pytest
import torch

import kv_transfer.exchange.outgoing as outgoing_module
from kv_transfer.codec import KVHeader, KVKind, get_codec
from kv_transfer.exchange.endpoint import KVEndpoint, TransferFailed
from kv_transfer.exchange.outgoing import RegisteredKV
from kv_transfer.transport.base import TransportError, XferState
from kv_transfer.transport.fake import FakeFabric, InProcessTransport
from kv_transfer.vllm.paged import PagedLayout, block_images, block_spans
from protocol.transfers import TransferOutcome

LAYERS, TOKENS, HEADS, DIM = 4, 70, 3, 64
NOTHING_HELD = {"regions": 0, "landed": 0, "reserved": 0, "predecoded": 0, "pulls": 0}
_ids = itertools.count()


def _layers(seed: int = 0, count: int = LAYERS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(TOKENS, HEADS, DIM, generator=gen).to(torch.bfloat16),
            torch.randn(TOKENS, HEADS, DIM, generator=gen).to(torch.bfloat16),
        )
        for _ in range(count)
    ]


def _send(sender: KVEndpoint, receiver: KVEndpoint, codec: str, layers) -> str:
    tid = f"t{next(_ids)}"
    raw = sum(k.numel() * 2 + v.numel() * 2 for k, v in layers)
    out = sender.open(
        tid,
        "req",
        receiver.address,
        layers=LAYERS,
        raw_bytes=raw,
        tokens=TOKENS,
        codec=get_codec(codec),
        reason="test",
    )
    for i, (k, v) in enumerate(layers):
        sender.send_layer(out, i, k, v)
    record = sender.finish(out)
    assert record.outcome is TransferOutcome.SUCCESS and record.raw_bytes == raw
    return tid


@pytest.mark.parametrize("codec", ["none", "lossless", "fp8", "int8", "int4"])
def test_layers_arrive_decoded_and_everything_is_freed(pair, codec: str) -> None:
    sender, receiver, _, _ = pair
    layers = _layers()
    tid = _send(sender, receiver, codec, layers)
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


def _open(sender: KVEndpoint, receiver: KVEndpoint, tid: str, codec: str, layers: int = LAYERS):
    """A transfer of ``layers`` layers of TOKENS tokens, open."""
    return sender.open(
        tid,
        "req",
        receiver.address,
        layers=layers,
        raw_bytes=layers * 2 * TOKENS * HEADS * DIM * 2,
        tokens=TOKENS,
        codec=get_codec(codec),
    )


def _wait_early(receiver: KVEndpoint, tid: str, layers: int) -> None:
    deadline = time.monotonic() + 5
    while receiver.early_layers(tid) < layers:
        assert time.monotonic() < deadline, f"{receiver.early_layers(tid)} of {layers} layers decoded early"
        time.sleep(0.002)


def test_compressed_layers_are_decoded_while_later_ones_are_on_the_way(pair) -> None:
    """The receiver decodes each layer as it lands, before the sender finishes: the load only collects
    them (here the staging bytes are wiped after the commit, and the load still gets every value)."""
    sender, receiver, _, _ = pair
    layers = _layers(5)
    out = _open(sender, receiver, "early", "lossless")
    for i, (k, v) in enumerate(layers[:-1]):
        sender.send_layer(out, i, k, v)
    _wait_early(receiver, "early", LAYERS - 1)
    sender.send_layer(out, LAYERS - 1, *layers[-1])
    _wait_early(receiver, "early", LAYERS)
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
        layers = _layers(6)
        fabric.corrupt_writes = 1
        tid = _send(sender, tight, "int8", layers)
        landed = tight.take(tid)
        assert landed is not None and landed.manifest["retries"] == 1 and tight.early_layers(tid) == 0
        got = [k for _, k, _ in tight.decode_layers(landed)]
        assert all((k.float() - k0.float()).abs().max() < 0.1 for k, (k0, _) in zip(got, layers, strict=True))
        tight.release(tid, decode_s=0.0)
        assert tight.held == NOTHING_HELD
    finally:
        tight.close()


class _Pending:
    """A write on a slow link: it lands when the test says so."""

    def __init__(self, land) -> None:
        self._land = land
        self._state = XferState.PENDING

    def land(self) -> None:
        self._state = self._land().state()

    def state(self) -> XferState:
        return self._state

    def release(self) -> None:
        return None


class _SlowLink(InProcessTransport):
    def __init__(self, name: str, capacity: int, fabric: FakeFabric) -> None:
        super().__init__(name, capacity, fabric)
        self.posted: list[_Pending] = []

    def write(self, peer, local_offset, remote_offset, nbytes, notif=b""):
        write = super().write
        self.posted.append(_Pending(lambda: write(peer, local_offset, remote_offset, nbytes, notif)))
        return self.posted[-1]

    def write_from(self, peer, spans, notif=b""):
        write_from = super().write_from
        self.posted.append(_Pending(lambda: write_from(peer, spans, notif)))
        return self.posted[-1]


def _slow_pair(name: str) -> tuple[_SlowLink, KVEndpoint, KVEndpoint]:
    """A sender on a slow link (its writes land when the test says) and a receiver."""
    fabric = FakeFabric()
    link = _SlowLink(f"{name}-p", 1 << 20, fabric)
    return link, KVEndpoint(link), KVEndpoint(InProcessTransport(f"{name}-d", 1 << 20, fabric))


def _registered_kv(layer: torch.Tensor) -> tuple[RegisteredKV, RegisteredKV]:
    key, value = (
        RegisteredKV(KVHeader("none", kind, tuple(half.shape), half.dtype), [(half.data_ptr(), half.nbytes)])
        for kind, half in ((KVKind.KEY, layer[0]), (KVKind.VALUE, layer[1]))
    )
    return key, value


def _send_registered(sender: KVEndpoint, out, layers: list[torch.Tensor], *, together: bool = False) -> None:
    """Send each ``[2, tokens, heads, dim]`` layer (keys, values) straight from its registered memory, one
    call each or (``together``) in one call."""
    for layer in layers:
        sender.transport.register(layer)
    if together:
        sender.send_layers_from(out, ((i, *_registered_kv(layer)) for i, layer in enumerate(layers)))
        return
    for i, layer in enumerate(layers):
        sender.send_layer_from(out, i, *_registered_kv(layer))


def _check_landed(receiver: KVEndpoint, tid: str, layers: list[torch.Tensor]) -> None:
    incoming = receiver.take(tid)
    assert incoming is not None
    got = list(receiver.decode_layers(incoming))
    assert [i for i, _, _ in got] == list(range(len(layers)))
    for (_, k, v), layer in zip(got, layers, strict=True):
        assert torch.equal(k, layer[0]) and torch.equal(v, layer[1])
    receiver.release(tid, decode_s=0.0)
    assert receiver.held == NOTHING_HELD


def _kv_stack(seed: int) -> list[torch.Tensor]:
    """Layers as vLLM holds them: one tensor each, keys then values."""
    return [torch.stack(pair) for pair in _layers(seed)]


@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "together"])
def test_raw_layers_leave_in_as_few_writes_as_they_can(together: bool) -> None:
    """Sent from registered memory (codec none) one by one, the first layer goes at once and the layers
    queued while it travels leave in one write, not one each; sent together (a migration's blocks, all
    ready at once), they all leave in one write. Either way they land bit-exact."""
    name = f"merge-{together}"
    link, sender, receiver = _slow_pair(name)
    try:
        layers = _kv_stack(9)
        out = _open(sender, receiver, name, "none")
        _send_registered(sender, out, layers, together=together)
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
        _check_landed(receiver, name, layers)
    finally:
        sender.close()
        receiver.close()


def _sent_over_slow_link(name: str, codec: str, seed: int):
    """(link, sender, receiver, layers, the open transfer) once every layer is sent over a slow link."""
    link, sender, receiver = _slow_pair(name)
    layers = _layers(seed)
    out = _open(sender, receiver, name, codec)
    for i, (k, v) in enumerate(layers):
        sender.send_layer(out, i, k, v)
    return link, sender, receiver, layers, out


def _wait_posted(link: _SlowLink, writes: int) -> None:
    deadline = time.monotonic() + 5
    while len(link.posted) < writes:
        assert time.monotonic() < deadline, f"{len(link.posted)} of {writes} writes posted"
        time.sleep(0.002)


def test_on_a_slow_link_layers_go_out_one_after_another_and_are_decoded_as_each_lands(monkeypatch) -> None:
    """Layers posted all at once would share the link and land together at the end; within the window
    (here one layer) each lands in turn, and the receiver decodes it while the next is on the wire."""
    monkeypatch.setattr(outgoing_module, "_WINDOW_BYTES", 1)
    link, sender, receiver, _, out = _sent_over_slow_link("slow", "int8", 8)
    try:
        assert len(link.posted) == 1  # the others wait for the window
        finishing = threading.Thread(target=sender.finish, args=(out,))
        finishing.start()
        for landed in range(1, LAYERS + 1):
            link.posted[landed - 1].land()
            _wait_early(receiver, "slow", landed)
            if landed < LAYERS:
                _wait_posted(link, landed + 1)
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


def test_an_aborted_transfer_frees_its_early_decoded_layers(pair) -> None:
    sender, receiver, _, _ = pair
    out = _one_layer_sent(sender, receiver, "gone", "int4")
    _wait_early(receiver, "gone", 1)
    sender.abort(out, "client left")
    assert sender.held == receiver.held == NOTHING_HELD


def test_a_layer_corrupted_once_is_sent_again(pair) -> None:
    sender, receiver, fabric, _ = pair
    fabric.corrupt_writes = 1
    layers = _layers(1)
    tid = _send(sender, receiver, "none", layers)
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
    k, v = _layers()[0]
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
    tid = _send(sender, receiver, "int4", _layers())
    clock.now += 11
    assert receiver.take(tid) is None
    (record,) = receiver.drain_records()
    assert record.outcome is TransferOutcome.ABORTED and "lease expired" in record.error
    assert receiver.held["regions"] == 0


def test_an_idle_receiver_still_frees_a_lapsed_transfer(pair) -> None:
    """Nobody calls ``take`` on an idle engine (a client left right after a migration's hand-over): the
    leak check and the next reservation end lapsed transfers themselves."""
    sender, receiver, _, clock = pair
    _send(sender, receiver, "none", _layers())
    assert receiver.held == {"regions": 1, "landed": 1, "reserved": 0, "predecoded": 0, "pulls": 0}
    clock.now += 11
    assert receiver.held == NOTHING_HELD
    (record,) = receiver.drain_records()
    assert record.outcome is TransferOutcome.ABORTED and "lease expired" in record.error


def test_renewed_kv_outlives_its_lease_while_the_request_waits(pair) -> None:
    """A decode request queued behind a full batch for longer than the lease keeps its landed KV as long as
    its engine renews it; once renewals stop, the lease frees it."""
    sender, receiver, _, clock = pair
    layers = _layers(3)
    tid = _send(sender, receiver, "none", layers)
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


def test_a_receiver_knows_which_transfers_will_never_land(pair) -> None:
    """A load waiting for a part still on its way (a migration's last stage) must learn at once when the
    sender dropped it, or when it lapsed, rather than wait out its deadline; a loaded transfer is not gone."""
    sender, receiver, _, clock = pair
    assert receiver.gone("on-its-way") is None
    sender.drop_remote(receiver.address, ["on-its-way"], "the source failed")
    assert receiver.gone("on-its-way") == "the source failed"
    lapsing = _send(sender, receiver, "none", _layers())
    loaded = _send(sender, receiver, "none", _layers())
    assert receiver.gone(lapsing) is None and receiver.take(loaded) is not None
    receiver.release(loaded, decode_s=0.01)
    clock.now += 11
    assert receiver.take(lapsing) is None
    assert "lease expired" in (receiver.gone(lapsing) or "")
    assert receiver.gone(loaded) is None


def test_over_real_nixl_layers_are_decoded_as_they_land() -> None:
    """The same, through two real NIXL agents on UCX: each compressed layer's notification reaches the
    receiver, which decodes every layer ahead of the load."""
    from kv_transfer.transport.nixl import NixlTransport

    sender = KVEndpoint(NixlTransport("it-p", 4 << 20), timeout_s=10)
    receiver = KVEndpoint(NixlTransport("it-d", 4 << 20), timeout_s=10)
    try:
        layers = _layers(7)
        out = _open(sender, receiver, "nixl-early", "lossless")
        for i, (k, v) in enumerate(layers):
            sender.send_layer(out, i, k, v)
        sender.finish(out)
        _wait_early(receiver, "nixl-early", LAYERS)
        landed = receiver.take("nixl-early")
        assert landed is not None
        for (_, k, v), (k0, v0) in zip(receiver.decode_layers(landed), layers, strict=True):
            assert torch.equal(k, k0) and torch.equal(v, v0)
        receiver.release("nixl-early", decode_s=0.0)
        assert receiver.held == NOTHING_HELD
    finally:
        sender.close()
        receiver.close()


def test_over_real_nixl_raw_layers_from_several_registered_tensors_land_in_one_write() -> None:
    """One NIXL write may read from several registered tensors (vLLM keeps one per layer), so the layers
    merged into one land bit-exact, through the transport and through the endpoints. Spans the transport
    joins (adjacent on both sides) land as exactly as those it cannot (a layer's halves swapped)."""
    from kv_transfer.transport.nixl import NixlTransport

    here, there = NixlTransport("it-zp", 4 << 20), NixlTransport("it-zd", 4 << 20)
    try:
        here.add_peer(there.peer_info())
        layers = _kv_stack(10)
        for layer in layers:
            here.register(layer)
        spans, offset, expected = [], 0, []
        for i, layer in enumerate(layers):
            half = layer.nbytes // 2
            if i == 3:  # halves swapped on arrival: adjacent here, not there
                spans += [(layer.data_ptr() + half, offset, half), (layer.data_ptr(), offset + half, half)]
                expected.append(torch.stack([layer[1], layer[0]]))
            else:  # halves adjacent on both sides
                spans += [(layer.data_ptr(), offset, half), (layer.data_ptr() + half, offset + half, half)]
                expected.append(layer)
            offset += layer.nbytes
        xfer = here.write_from("it-zd", spans)
        deadline = time.monotonic() + 10
        while (state := xfer.state()) is XferState.PENDING:
            assert time.monotonic() < deadline, "the write never landed"
            time.sleep(0.001)
        xfer.release()
        assert state is XferState.DONE
        landed = there.buffer[:offset].view(torch.bfloat16).view(len(layers), *layers[0].shape)
        assert torch.equal(landed, torch.stack(expected))
        # a span running past its tensor, or from memory never registered, is refused before anything moves
        stray = torch.zeros(64, dtype=torch.uint8)
        past = layers[0].data_ptr() + layers[0].nbytes - 8
        for bad in ([(stray.data_ptr(), 0, 64)], [(layers[1].data_ptr(), 0, 64), (past, 64, 16)]):
            with pytest.raises(TransportError, match="not in a registered tensor"):
                here.write_from("it-zd", bad)
    finally:
        here.close()
        there.close()

    sender = KVEndpoint(NixlTransport("it-zp2", 4 << 20), timeout_s=10)
    receiver = KVEndpoint(NixlTransport("it-zd2", 4 << 20), timeout_s=10)
    try:
        out = _open(sender, receiver, "nixl-merged", "none")
        _send_registered(sender, out, layers)
        assert sender.finish(out).outcome is TransferOutcome.SUCCESS
        _check_landed(receiver, "nixl-merged", layers)
    finally:
        sender.close()
        receiver.close()


def test_nixl_threads_yield_to_the_engine() -> None:
    """NIXL's progress and UCX threads move bytes on the engine's cores: they run ``nice`` steps lower."""
    from kv_transfer.transport.nixl import NixlTransport

    def threads() -> dict[int, int]:
        return {int(t): os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    before = threads()
    transport = NixlTransport("it-nice", 1 << 20, nice=7)
    try:
        started = [nice for tid, nice in threads().items() if tid not in before]
        assert mine + 7 in started  # NIXL's progress thread (and UCX's, in a fresh process); torch's stay
    finally:
        transport.close()
