"""The sending half of a KV transfer: one ``OutgoingTransfer`` from ``KVEndpoint.open`` to ``finish`` or
``abort``. Each layer is staged (encoded into the local staging region, alone or in a group of small
layers, or named as spans of registered memory for codec ``none``), queued, and posted as a one-sided
write while the window allows; ``drain`` posts the rest and waits for every write. The endpoint owns the
reservations, the commit and the records."""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_transfer.codec import KVCodec, KVKind
from kv_transfer.codec.base import KVHeader
from kv_transfer.exchange.wire import header_to_wire, place_parts, slot_sum
from kv_transfer.transport.arena import Region
from kv_transfer.transport.base import Transport, TransportError, Xfer, XferState
from kv_transfer.transport.side_channel import SideChannelClient
from protocol.kv_ops import Pull, PullStatus
from protocol.transfers import TransferOutcome, TransferRecord

_POLL_MIN_S, _POLL_MAX_S = 0.0001, 0.002  # how often a sender checks its writes: first, and at most
_POLL_SHARE = 0.125  # a sender sleeps at most this share of the time its writes have been on the wire
LAYER_NOTE = b"pdflow-layer:"  # prefix of the notification that comes with each compressed layer's write
_PULL_POLL_MAX_S = 0.02  # how often a sender asks at most whether the receiver's pull is done (a round trip)
_WINDOW_BYTES = 8 << 20  # a transfer's writes on the wire at once, at most (one layer, whatever its size)
_WINDOW_WRITES = 2
"""A compressed transfer's writes on the wire at once, at most: one travelling and one queued behind it.
UCX shares a link among the writes posted to it, so more would land together near the end and leave the
receiver nothing to decode early (SmolLM2, 512 tokens, int8 on 1 Gbit/s: with every write posted at once,
about half the layers were still undecoded at the commit)."""
GROUP_ELEMENTS = 1 << 19
"""Elements of K, at most, in a group of small layers encoded together (``OutgoingTransfer.hold``): one codec
chunk on the CPU (``groups.CPU_CHUNK_ELEMENTS``). A codec call costs a few dozen small torch operations,
which at a few hundred tokens a layer cost more than the arithmetic: SmolLM2 at 512 tokens, 30 layers, one
thread, int8 encoded 17.6 ms one layer at a time and 10-13 ms five at a time, decoded 9.0 and 4.5 ms."""


def wire_bound(raw_bytes: int, layers: int) -> int:
    """Bytes to reserve for ``raw_bytes`` over ``layers`` layers, whatever the codec: the lossy codecs are
    smaller than raw, the lossless one at most ~0.4% larger on incompressible data; plus alignment."""
    return int(raw_bytes * 1.02) + layers * 8 * 1024


@dataclass(frozen=True, slots=True)
class RegisteredKV:
    """One layer's K or V exactly as it sits in memory registered with the transport: its header (codec
    ``none``) and its bytes, in order, as ``(address, nbytes)`` spans of one registered tensor."""

    header: KVHeader
    spans: list[tuple[int, int]]


@dataclass(slots=True)
class OutgoingTransfer:
    """Owned by the sending thread from ``open`` to ``finish``/``abort``."""

    transfer_id: str
    request_id: str
    codec: KVCodec
    reason: str
    peer: str
    client: SideChannelClient
    local: Region
    remote_offset: int
    layers: int
    tokens: int
    transport: Transport
    clock: Callable[[], float]
    timeout_s: float
    cursor: int = 0
    slots: list[dict[str, Any]] = field(default_factory=list)
    xfers: list[tuple[int, Xfer]] = field(default_factory=list)
    raw_bytes: int = 0
    wire_bytes: int = 0
    encode_s: float = 0.0
    first_post: float | None = None
    queued: deque[int] = field(default_factory=deque)  # slots encoded, their writes not posted yet
    in_flight: dict[int, tuple[Xfer, int]] = field(default_factory=dict)  # slot -> its write, bytes; not done
    failed: list[int] = field(default_factory=list)  # slots whose write failed
    sources: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)  # slot -> registered spans
    layers_staged: int = 0
    held: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # kept back by ``hold``
    origin: str = ""  # this side's transport name (the peer a pull reads from)
    pulled: bool = False  # the receiver reads the registered layers (``pull_at``); nothing is posted here
    pull_rate: float | None = None

    @property
    def destination(self) -> str:
        """The receiver's side-channel address (``peer`` is its transport's name)."""
        return self.client.address

    def hold(self, index: int, key: torch.Tensor, value: torch.Tensor, *, checksum: bool) -> None:
        """Stage a layer that the caller leaves unchanged until ``finish``: kept back while it and the layers
        held before it (consecutive, alike in shape and dtype) fit a group of ``GROUP_ELEMENTS``, then
        encoded with them as one slot. ``flush`` stages what is held. The first layer goes alone, so the
        wire starts after one layer's encoding, and so do the last ``_WINDOW_WRITES``: their writes share
        the link at the end and land together, and the receiver decodes what lands last after it lands."""
        alone = index == 0 or index >= self.layers - _WINDOW_WRITES
        if self.held:
            last, last_key, _ = self.held[-1]
            alike = index == last + 1 and _alike(key, last_key) and _alike(value, self.held[-1][2])
            if alone or not alike or _elements(self.held) + key.numel() > GROUP_ELEMENTS:
                self.flush(checksum=checksum)
        self.held.append((index, key, value))
        if alone or _elements(self.held) + key.numel() > GROUP_ELEMENTS:  # the next would not fit
            self.flush(checksum=checksum)

    def flush(self, *, checksum: bool) -> None:
        """Stage the layers ``hold`` kept back, as one slot."""
        if self.held:
            group, self.held = self.held, []
            self.stage(group[0][0], [(key, value) for _, key, value in group], checksum=checksum)

    def stage(self, index: int, layers: list[tuple[torch.Tensor, torch.Tensor]], *, checksum: bool) -> None:
        """Encode the K and V of consecutive layers from ``index`` into local staging (with a checksum if
        ``checksum``) and queue them as one slot. Several layers travel side by side along the heads axis,
        ``[T, layers * H, D]`` (``wire.decode_slot`` splits them): each layer's values are coded exactly as
        alone, since no quantization group spans two heads."""
        started = time.perf_counter()
        if len(layers) == 1:
            key, value = layers[0]
        else:
            key, value = (torch.cat([layer[half] for layer in layers], dim=1) for half in (0, 1))
        encoded = (self.codec.encode(key, KVKind.KEY), self.codec.encode(value, KVKind.VALUE))
        buf = self.transport.buffer
        start = self.cursor
        slot: dict[str, Any] = {"index": index, "offset": start}
        if len(layers) > 1:
            slot["layers"] = len(layers)
        self.layers_staged += len(layers)
        for name, enc in zip(("k", "v"), encoded, strict=True):
            placed, end = place_parts(self.codec.part_specs(enc.header), self.cursor)
            for (offset, _), part in zip(placed, enc.parts, strict=True):
                flat = part.data.reshape(-1).view(torch.uint8)
                buf[self.local.offset + offset : self.local.offset + offset + flat.numel()].copy_(flat)
            slot[name] = header_to_wire(enc.header)
            self.cursor = end
            self.raw_bytes += enc.header.raw_nbytes
            self.wire_bytes += enc.nbytes
        self._check_room()
        slot["nbytes"] = self.cursor - start
        if checksum:
            slot["sum"] = slot_sum(buf, self.local.offset + start, slot["nbytes"])
        self.queue(slot, started)

    def stage_from(self, index: int, key: RegisteredKV, value: RegisteredKV) -> None:
        """Queue one layer to be written straight from registered memory (codec ``none``), unposted."""
        if self.codec.compresses:
            raise ValueError(f"transfer {self.transfer_id}: only codec none sends from registered memory")
        started = time.perf_counter()
        slot: dict[str, Any] = {"index": index, "offset": self.cursor}
        spans = []
        for name, part in (("k", key), ("v", value)):
            ((offset, spec),), end = place_parts(self.codec.part_specs(part.header), self.cursor)
            if sum(n for _, n in part.spans) != spec.nbytes:
                raise ValueError(f"layer {index} {name}: spans hold other than the header's {spec.nbytes} B")
            for address, nbytes in part.spans:
                spans.append((address, self.remote_offset + offset, nbytes))
                offset += nbytes
            slot[name] = header_to_wire(part.header)
            self.cursor = end
            self.raw_bytes += part.header.raw_nbytes
            self.wire_bytes += spec.nbytes
        self._check_room()
        self.layers_staged += 1
        slot["nbytes"] = self.cursor - int(slot["offset"])
        self.queue(slot, started, spans, pump=False)

    def queue(
        self,
        slot: dict[str, Any],
        started: float,
        spans: list[tuple[int, int, int]] | None = None,
        *,
        pump: bool = True,
    ) -> None:
        """Add a layer's slot (written from ``spans`` of registered memory, or else from staging) to the
        transfer and (``pump``) post what the window allows."""
        self.encode_s += time.perf_counter() - started
        self.slots.append(slot)
        if spans is not None:
            self.sources[len(self.slots) - 1] = spans
        if self.first_post is None:
            self.first_post = self.clock()
        self.queued.append(len(self.slots) - 1)
        if pump:
            self.pump()

    def pull_at(self, rate: float | None) -> None:
        """Have the receiver read this transfer's layers (all from registered memory) out of this side's
        memory rather than write them (``pull``), at ``rate`` bytes a second at most (None: at once)."""
        self.pulled, self.pull_rate = True, rate

    def pump(self) -> None:
        """Without waiting: note the writes that ended (NIXL completes some writes, and sends their
        notifications, only when their state is checked), then post queued layers while the window has
        room (``_WINDOW_BYTES``, ``_WINDOW_WRITES``). A compressed slot's write carries a notification, so
        that the receiver decodes it early.
        Layers sent from registered memory go out one write at a time: those queued while one is on the
        wire leave together in the next (each write costs tens of microseconds on both sides, and a raw
        layer gains nothing from landing alone). A pulled transfer posts nothing."""
        if self.pulled:
            return
        for position, (xfer, _) in list(self.in_flight.items()):
            state = xfer.state()
            if state is not XferState.PENDING:
                del self.in_flight[position]
                if state is XferState.FAILED:
                    self.failed.append(position)
        while self.queued and not self.failed:
            if self.queued[0] in self.sources:
                if self.in_flight:
                    return
                batch = [self.queued.popleft()]
                while self.queued and self.queued[0] in self.sources:
                    batch.append(self.queued.popleft())
                xfer = self.transport.write_from(self.peer, [s for p in batch for s in self.sources[p]])
                self.xfers.append((batch[0], xfer))
                self.in_flight[batch[0]] = (xfer, sum(int(self.slots[p]["nbytes"]) for p in batch))
                continue
            slot = self.slots[self.queued[0]]
            windowed = self.codec.compresses  # only a layer decoded on landing gains from its order
            on_wire = sum(n for _, n in self.in_flight.values())
            if (
                windowed
                and self.in_flight
                and (on_wire + int(slot["nbytes"]) > _WINDOW_BYTES or len(self.in_flight) >= _WINDOW_WRITES)
            ):
                return
            position = self.queued.popleft()
            note = b""
            if self.codec.compresses:  # a raw layer needs no decoding: nothing to start early
                note = LAYER_NOTE + json.dumps({"t": self.transfer_id, "p": position, "s": slot}).encode()
            offset, nbytes = int(slot["offset"]), int(slot["nbytes"])
            xfer = self.transport.write(
                self.peer, self.local.offset + offset, self.remote_offset + offset, nbytes, note
            )
            self.xfers.append((position, xfer))  # all released at the end
            self.in_flight[position] = (xfer, nbytes)

    def drain(self) -> None:
        """Post every queued layer and wait for every write, backing off as ``wait`` does (a pulled
        transfer: have the receiver read them, and wait for that)."""
        if self.pulled:
            self._pull()
            return
        deadline = self.clock() + self.timeout_s
        since = time.perf_counter()
        while True:
            posted = len(self.xfers)
            self.pump()
            if len(self.xfers) != posted:  # a new write: its end is checked for from the shortest pause again
                since = time.perf_counter()
            if self.failed:
                index = self.slots[self.failed[0]]["index"]
                raise TransportError(f"write of layer {index} to {self.peer} failed")
            if not self.queued and not self.in_flight:
                return
            if self.clock() > deadline:
                index = self.slots[self.queued[0] if self.queued else min(self.in_flight)]["index"]
                raise TimeoutError(f"layer {index} not delivered to {self.peer} within {self.timeout_s:g} s")
            time.sleep(_pause(since))

    def wait(self, xfers: list[tuple[int, Xfer]]) -> None:
        """Poll the writes until done, backing off as ``_pause`` says: this thread shares the engine's
        process (and GIL) and must not wake thousands of times a second during a long push."""
        deadline = self.clock() + self.timeout_s
        since = time.perf_counter()
        for index, xfer in xfers:
            while (state := xfer.state()) is XferState.PENDING:
                if self.clock() > deadline:
                    raise TimeoutError(
                        f"layer {index} not delivered to {self.peer} within {self.timeout_s:g} s"
                    )
                time.sleep(_pause(since))
            if state is XferState.FAILED:
                raise TransportError(f"write of layer {index} to {self.peer} failed")

    def sent_record(self, retries: int, landed_at: float, done_computing: float) -> TransferRecord:
        """The sender's SUCCESS record once every layer landed at ``landed_at``."""
        first = self.first_post if self.first_post is not None else landed_at
        return TransferRecord(
            self.transfer_id,
            self.request_id,
            TransferOutcome.SUCCESS,
            codec=str(self.codec.name),
            reason=self.reason,
            layers=self.layers,
            tokens=self.tokens,
            raw_bytes=self.raw_bytes,
            wire_bytes=self.wire_bytes,
            encode_s=self.encode_s,
            wire_s=landed_at - first,
            tail_s=max(0.0, landed_at - done_computing),
            retries=retries,
            peer=self.peer,
        )

    def _pull(self) -> None:
        """Ask the receiver to read every queued layer (``kv_transfer.exchange.pull``) and poll it until it
        has; a pull it refuses or that fails there raises ``SideChannelError`` with its reason."""
        if any(p not in self.sources for p in self.queued):
            raise ValueError(f"transfer {self.transfer_id}: only layers in registered memory can be pulled")
        slots, self.queued = [self.sources[p] for p in self.queued], deque()
        call_s = min(self.timeout_s, 5.0)
        wire = [[list(span) for span in spans] for spans in slots]
        self.client.ask(Pull(self.transfer_id, self.origin, wire, self.pull_rate), timeout_s=call_s)
        deadline = self.clock() + self.timeout_s
        if self.pull_rate:  # paced, it ends no sooner than its last slot starts: no use asking before then
            ahead = sum(n for spans in slots[:-1] for *_, n in spans)
            time.sleep(min(ahead / self.pull_rate, self.timeout_s))
        since = time.perf_counter()
        status = PullStatus(self.transfer_id)
        while not self.client.ask(status, timeout_s=call_s).done:
            if self.clock() > deadline:
                raise TimeoutError(
                    f"{self.peer} did not pull transfer {self.transfer_id} within {self.timeout_s:g} s"
                )
            time.sleep(min(_PULL_POLL_MAX_S, max(_POLL_MIN_S, (time.perf_counter() - since) * _POLL_SHARE)))

    def _check_room(self) -> None:
        if self.cursor > self.local.nbytes:
            raise ValueError(
                f"transfer {self.transfer_id}: {self.cursor} B encoded, {self.local.nbytes} B reserved"
            )


def _elements(held: list[tuple[int, torch.Tensor, torch.Tensor]]) -> int:
    return sum(key.numel() for _, key, _ in held)


def _alike(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two layers' K (or V) that can sit side by side along the heads axis."""
    return (
        a.dim() == b.dim() == 3
        and a.shape[0] == b.shape[0]
        and a.shape[2] == b.shape[2]
        and a.dtype == b.dtype
        and a.device == b.device
    )


def _pause(since: float) -> float:
    """How long a sender sleeps before it checks its writes again, their last one posted at ``since``
    (``perf_counter``): a share of the time waited so far, from ``_POLL_MIN_S`` to ``_POLL_MAX_S``. A write
    is then noticed at most about an eighth of its time late (doubling pauses noticed a 3 ms write up to
    2 ms late), with a few dozen checks for a short write and 500 a second for a long one."""
    return min(_POLL_MAX_S, max(_POLL_MIN_S, (time.perf_counter() - since) * _POLL_SHARE))
