"""KV transfers between test endpoints: the tensors, the usual ways to send and open them, and the checks
that they landed bit for bit and left nothing held."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator

import torch

from kv_transfer.codec import KVHeader, KVKind, get_codec
from kv_transfer.exchange.endpoint import KVEndpoint
from kv_transfer.exchange.outgoing import RegisteredKV
from kv_transfer.transport.base import XferState
from kv_transfer.transport.fake import FakeFabric, InProcessTransport
from protocol.transfers import TransferOutcome

LAYERS, TOKENS, HEADS, DIM = 4, 70, 3, 64
NOTHING_HELD = {"regions": 0, "landed": 0, "reserved": 0, "predecoded": 0, "pulls": 0}
_ids = itertools.count()


@contextlib.contextmanager
def endpoint_pair(secret: bytes | None = None) -> Iterator[tuple[KVEndpoint, KVEndpoint]]:
    """A sending and a receiving endpoint on one in-process fabric, their side channels signed with
    ``secret`` (None: unsigned, on loopback)."""
    fabric = FakeFabric()
    sender = KVEndpoint(InProcessTransport("p", 1 << 20, fabric), secret=secret)
    receiver = KVEndpoint(InProcessTransport("d", 1 << 20, fabric), secret=secret)
    try:
        yield sender, receiver
    finally:
        sender.close()
        receiver.close()


def make_layers(seed: int = 0, count: int = LAYERS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(TOKENS, HEADS, DIM, generator=gen).to(torch.bfloat16),
            torch.randn(TOKENS, HEADS, DIM, generator=gen).to(torch.bfloat16),
        )
        for _ in range(count)
    ]


def send(sender: KVEndpoint, receiver: KVEndpoint, codec: str, layers) -> str:
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


def open_transfer(sender: KVEndpoint, receiver: KVEndpoint, tid: str, codec: str, layers: int = LAYERS):
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


def wait_early(receiver: KVEndpoint, tid: str, layers: int) -> None:
    deadline = time.monotonic() + 5
    while receiver.early_layers(tid) < layers:
        assert time.monotonic() < deadline, f"{receiver.early_layers(tid)} of {layers} layers decoded early"
        time.sleep(0.002)


def registered_kv(layer: torch.Tensor) -> tuple[RegisteredKV, RegisteredKV]:
    key, value = (
        RegisteredKV(KVHeader("none", kind, tuple(half.shape), half.dtype), [(half.data_ptr(), half.nbytes)])
        for kind, half in ((KVKind.KEY, layer[0]), (KVKind.VALUE, layer[1]))
    )
    return key, value


def send_registered(sender: KVEndpoint, out, layers: list[torch.Tensor], *, together: bool = False) -> None:
    """Send each ``[2, tokens, heads, dim]`` layer (keys, values) straight from its registered memory, one
    call each or (``together``) in one call."""
    for layer in layers:
        sender.transport.register(layer)
    if together:
        sender.send_layers_from(out, ((i, *registered_kv(layer)) for i, layer in enumerate(layers)))
        return
    for i, layer in enumerate(layers):
        sender.send_layer_from(out, i, *registered_kv(layer))


def check_landed(receiver: KVEndpoint, tid: str, layers: list[torch.Tensor]) -> None:
    incoming = receiver.take(tid)
    assert incoming is not None
    got = list(receiver.decode_layers(incoming))
    assert [i for i, _, _ in got] == list(range(len(layers)))
    for (_, k, v), layer in zip(got, layers, strict=True):
        assert torch.equal(k, layer[0]) and torch.equal(v, layer[1])
    receiver.release(tid, decode_s=0.0)
    assert receiver.held == NOTHING_HELD


def kv_stack(seed: int) -> list[torch.Tensor]:
    """Layers as vLLM holds them: one tensor each, keys then values."""
    return [torch.stack(pair) for pair in make_layers(seed)]


class PendingWrite:
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


class SlowLink(InProcessTransport):
    def __init__(self, name: str, capacity: int, fabric: FakeFabric) -> None:
        super().__init__(name, capacity, fabric)
        self.posted: list[PendingWrite] = []

    def write(self, peer, local_offset, remote_offset, nbytes, notif=b""):
        write = super().write
        self.posted.append(PendingWrite(lambda: write(peer, local_offset, remote_offset, nbytes, notif)))
        return self.posted[-1]

    def write_from(self, peer, spans, notif=b""):
        write_from = super().write_from
        self.posted.append(PendingWrite(lambda: write_from(peer, spans, notif)))
        return self.posted[-1]


def slow_pair(name: str) -> tuple[SlowLink, KVEndpoint, KVEndpoint]:
    """A sender on a slow link (its writes land when the test says) and a receiver."""
    fabric = FakeFabric()
    link = SlowLink(f"{name}-p", 1 << 20, fabric)
    return link, KVEndpoint(link), KVEndpoint(InProcessTransport(f"{name}-d", 1 << 20, fabric))


def sent_over_slow_link(name: str, codec: str, seed: int):
    """(link, sender, receiver, layers, the open transfer) once every layer is sent over a slow link."""
    link, sender, receiver = slow_pair(name)
    layers = make_layers(seed)
    out = open_transfer(sender, receiver, name, codec)
    for i, (k, v) in enumerate(layers):
        sender.send_layer(out, i, k, v)
    return link, sender, receiver, layers, out


def wait_posted(link: SlowLink, writes: int) -> None:
    deadline = time.monotonic() + 5
    while len(link.posted) < writes:
        assert time.monotonic() < deadline, f"{len(link.posted)} of {writes} writes posted"
        time.sleep(0.002)
