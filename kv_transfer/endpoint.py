"""A worker's KV transfer endpoint: its transport, its staging arena, its side channel, and every transfer in
flight through it, in both directions (prefill → decode hand-off, decode → decode migration).

A transfer is pushed: the sender reserves a region in the receiver's arena over the side channel, encodes each
layer into its own staging as soon as it exists, and posts a one-sided write of it while later layers are
still computed; or pulled (a migration's pre-copy, ``pull``): the receiver reads the sender's registered
blocks into the region. ``finish`` waits for the last write (or read), then commits: the receiver checks sizes
and checksums, asks for a slot again if it is corrupt (once), and keeps the landed transfer until the engine
loads it (``take`` + ``decode_layers``) or its lease runs out. Every transfer ends in exactly one
``TransferRecord``, emitted by the side that ends it.

Each compressed slot's write carries a NIXL notification: the receiver decodes the slot as soon as it comes
and its checksum holds, on a thread of its own, while later layers are on the wire, and the load finds most
layers decoded (within ``predecode_bytes``; a layer over budget or not decoded yet is decoded at load).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from kv_transfer.codec import KVCodec, get_codec
from kv_transfer.outgoing import LAYER_NOTE, OutgoingTransfer, RegisteredKV, wire_bound
from kv_transfer.pull import Puller
from kv_transfer.transport.arena import Arena, Region
from kv_transfer.transport.base import Transport
from kv_transfer.transport.side_channel import SideChannelClient, SideChannelError, SideChannelServer
from kv_transfer.wire import decode_slot, peer_from_wire, peer_to_wire, raw_nbytes, slot_layers, slot_sum
from protocol.transfers import TransferOutcome, TransferRecord

log = logging.getLogger(__name__)
_GONE_KEPT = 4096  # ended transfers remembered for ``gone``
_PREDECODE_POLL_S = 0.001  # how often the decoding thread polls notifications while a transfer is on the way


class TransferFailed(Exception):
    """The transfer did not land; ``record`` says where it stopped."""

    def __init__(self, record: TransferRecord) -> None:
        super().__init__(record.error)
        self.record = record


@dataclass(frozen=True, slots=True)
class IncomingTransfer:
    """A transfer that landed and passed its checks, waiting in the arena for the engine to load it."""

    transfer_id: str
    request_id: str
    region: Region
    manifest: dict[str, Any]

    @property
    def tokens(self) -> int:
        return int(self.manifest["tokens"])


@dataclass(slots=True)
class _Predecoded:
    """The layers of one incoming transfer decoded before its load, by slot position (a slot holds one
    layer, or a group of them)."""

    layers: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    verified: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # (offset, nbytes, sum) checked
    nbytes: int = 0  # decoded bytes held or being decoded, counted against the budget
    seconds: float = 0.0


class KVEndpoint:
    """One per worker process. Sending calls (``open``, ``send_layer``, ``finish``, ``abort``) come from one
    thread (the engine's); the side channel serves the receiving half from its own thread; ``take``,
    ``decode_layers`` and ``release`` come from the engine's thread. A lock guards the shared state."""

    def __init__(
        self,
        transport: Transport,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        lease_s: float = 12.0,
        timeout_s: float = 30.0,
        checksum: bool = True,
        predecode_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``predecode_bytes``: decoded layers held ahead of their load, at most (default: the staging
        buffer's size; 0 turns early decoding off)."""
        self._transport = transport
        self._arena = Arena(transport.buffer.numel())
        self._lease_s = lease_s
        self._timeout_s = timeout_s
        self._checksum = checksum
        self._clock = clock
        self._lock = threading.Lock()
        self._landed: dict[str, IncomingTransfer] = {}
        self._incoming: dict[str, str] = {}  # reserved, not yet committed: transfer id -> request id
        self._quiet: set[str] = set()  # of those, the ones whose layers come with no notification to decode
        # transfers that ended here without being loaded (dropped by the sender, expired, failed), so that a
        # load waiting for one can fail at once: transfer id -> why; the newest _GONE_KEPT
        self._gone: OrderedDict[str, str] = OrderedDict()
        self._records: list[TransferRecord] = []
        self._clients: dict[tuple[int, str], SideChannelClient] = {}  # per sending thread and peer
        self._ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}
        self._predecode_budget = transport.buffer.numel() if predecode_bytes is None else predecode_bytes
        self._predecoded: dict[str, _Predecoded] = {}
        self._predecoded_bytes = 0
        self._wake = threading.Event()  # set when a transfer is reserved here
        self._closed = threading.Event()
        self._puller = Puller(transport, self._hold, timeout_s=timeout_s)  # transfers this side reads
        self._ops.update(pull=self._puller.start, pull_status=self._puller.status)
        self._server = SideChannelServer(self._handle, host=host, port=port)
        self.address = self._server.address
        self._decoder: threading.Thread | None = None
        if self._predecode_budget > 0:
            self._decoder = threading.Thread(
                target=self._predecode_loop, name="pdflow-kv-decode", daemon=True
            )
            self._decoder.start()

    # ---- sending ----

    def open(
        self,
        transfer_id: str,
        request_id: str,
        destination: str,
        *,
        layers: int,
        raw_bytes: int,
        tokens: int,
        codec: KVCodec,
        reason: str = "",
    ) -> OutgoingTransfer:
        """Reserve room on ``destination`` (a side-channel address) and here. Blocks for one round trip
        (deadline ``timeout_s``); raises ``TransferFailed`` if the peer refuses or cannot be reached."""
        nbytes = wire_bound(raw_bytes, layers)
        client = self._client(destination)
        mine = self._transport.peer_info()
        try:
            reply = client.call(
                {
                    "op": "reserve",
                    "transfer_id": transfer_id,
                    "request_id": request_id,
                    "nbytes": nbytes,
                    "peer": peer_to_wire(mine),
                    "notes": codec.name != "none",  # only a compressed layer's write notifies its landing
                },
                timeout_s=min(self._timeout_s, 5.0),
            )
            peer = peer_from_wire(reply["peer"])
            self._transport.add_peer(peer)
            with self._lock:
                local = self._arena.reserve(transfer_id, nbytes, now=self._clock(), lease_s=self._lease_s)
        except Exception as exc:  # unreachable peer, refused reservation, full arena, bad metadata
            record = self._record_failed(transfer_id, request_id, codec.name, reason, exc)
            raise TransferFailed(record) from exc
        return OutgoingTransfer(
            transfer_id,
            request_id,
            codec,
            reason,
            peer.name,
            client,
            local,
            int(reply["offset"]),
            layers,
            tokens,
            transport=self._transport,
            clock=self._clock,
            timeout_s=self._timeout_s,
            origin=mine.name,
        )

    def send_layer(
        self, t: OutgoingTransfer, index: int, key: torch.Tensor, value: torch.Tensor, *, hold: bool = False
    ) -> None:
        """Encode one layer's K and V (``[tokens, kv_heads, head_dim]``) into local staging and post its
        write. A compressed transfer keeps at most 8 MiB on the wire (a layer waits in a queue): its layers
        then land one after the other, not all at the end sharing the link, and the receiver
        decodes each as it lands. Never waits for the wire.

        ``hold``: the caller leaves ``key`` and ``value`` unchanged until ``finish`` (its own copies), so a
        compressing codec may keep a small layer back and encode it together with the next ones
        (``OutgoingTransfer.hold``): far fewer codec calls, writes and notifications for short prompts."""
        if hold and t.codec.name != "none":
            t.hold(index, key, value, checksum=self._checksum)
            return
        t.flush(checksum=self._checksum)
        t.stage(index, [(key, value)], checksum=self._checksum)

    def send_layer_from(
        self, t: OutgoingTransfer, index: int, key: RegisteredKV, value: RegisteredKV
    ) -> None:
        """Queue one layer's write straight out of registered memory, as ``send_layer`` does, for a transfer
        with codec ``none``: no encoding, no staging copy, and no checksum (the bytes are read while on the
        wire; the caller keeps them unchanged until ``finish``, or checks in its ``before_commit`` that
        they were). Never waits for the wire."""
        t.flush(checksum=self._checksum)
        t.stage_from(index, key, value)
        t.pump()

    def send_layers_from(
        self, t: OutgoingTransfer, layers: Iterable[tuple[int, RegisteredKV, RegisteredKV]]
    ) -> None:
        """``send_layer_from`` for layers that are all ready now (a migration's blocks): queued together,
        they leave in one write. Sent one by one, the first went alone and the others after it, and each
        call competed with the engine's own thread for the interpreter (a 4-block last push spent 6 to 19
        ms queueing its 30 layers while the source engine stepped)."""
        t.flush(checksum=self._checksum)
        for index, key, value in layers:
            t.stage_from(index, key, value)
        t.pump()

    def finish(
        self,
        t: OutgoingTransfer,
        *,
        compute_done_at: float | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> TransferRecord:
        """Wait for every write, call ``before_commit`` (an exception from it fails the transfer), commit
        on the receiver (one resend of any layer it finds corrupt), free the local staging. Blocks up to
        ``timeout_s``. Returns the sender's view of the record; raises ``TransferFailed`` with a FAILED
        record on any error (the receiver's reservation is released)."""
        done_computing = compute_done_at if compute_done_at is not None else self._clock()
        retries = 0
        try:
            t.flush(checksum=self._checksum)
            if t.layers_staged != t.layers:
                raise ValueError(f"{t.layers_staged} of {t.layers} layers were sent")
            t.drain()
            if before_commit is not None:
                before_commit()
            landed_at = self._clock()
            while True:
                sent = t.sent_record(retries, landed_at, done_computing)
                record = sent.to_dict()
                manifest = {"tokens": t.tokens, "retries": retries, "record": record, "slots": t.slots}
                reply = t.client.call(
                    {"op": "commit", "transfer_id": t.transfer_id, "manifest": manifest},
                    timeout_s=min(self._timeout_s, 10.0),
                )
                bad = [int(i) for i in reply.get("bad", ())]
                if not bad:
                    break
                layers = slot_layers(t.slots, bad)
                if retries >= 1:
                    raise ValueError(f"layers {layers} arrived corrupt twice (checksum mismatch)")
                retries += 1
                log.warning("transfer %s: layers %s corrupt on arrival; sending again", t.transfer_id, layers)
                t.queued.extend(bad)
                t.drain()
                landed_at = self._clock()
        except Exception as exc:
            self.abort(t, str(exc))
            failed = self._record_failed(t.transfer_id, t.request_id, t.codec.name, t.reason, exc, t.peer)
            raise TransferFailed(failed) from exc
        finally:
            for _, xfer in t.xfers:
                xfer.release()
        with self._lock:
            self._arena.release(t.transfer_id)
        return sent

    def abort(self, t: OutgoingTransfer, why: str) -> None:
        """Best effort: release both reservations (the receiver's lease frees it anyway if this is lost)."""
        with self._lock:
            self._arena.release(t.transfer_id)
        try:
            t.client.call({"op": "abort", "transfer_id": t.transfer_id, "why": why}, timeout_s=1.0)
        except SideChannelError as exc:
            log.info("abort of transfer %s not delivered: %s", t.transfer_id, exc)

    def drop_remote(self, destination: str, transfer_ids: list[str], why: str) -> None:
        """Best effort: free transfers this side pushed to ``destination`` that nobody will load (a migration
        that gave up after some stages landed). Their leases free them anyway if this is lost."""
        client = self._client(destination)
        for transfer_id in transfer_ids:
            try:
                client.call({"op": "abort", "transfer_id": transfer_id, "why": why}, timeout_s=1.0)
            except SideChannelError as exc:
                log.info("drop of transfer %s on %s not delivered: %s", transfer_id, destination, exc)

    def probe(self, destination: str, nbytes: int = 8 << 20) -> float:
        """Wire bandwidth to ``destination`` in bytes/s: one raw write of ``nbytes`` into a reservation, which
        is then released. Blocks for the round trip and the write (deadline ``timeout_s``)."""
        nbytes = min(nbytes, self._arena.capacity // 4)
        probe_id = f"probe-{time.monotonic_ns()}"
        t = self.open(
            probe_id, probe_id, destination, layers=1, raw_bytes=nbytes, tokens=0, codec=get_codec("none")
        )
        started = self._clock()
        xfer = self._transport.write(t.peer, t.local.offset, t.remote_offset, nbytes)
        try:
            t.wait([(0, xfer)])
            return nbytes / max(self._clock() - started, 1e-6)
        finally:
            xfer.release()
            self.abort(t, "bandwidth probe")

    # ---- receiving (engine thread) ----

    def take(self, transfer_id: str) -> IncomingTransfer | None:
        """The landed transfer, or None if it has not landed (yet). Never blocks."""
        self.expire()
        with self._lock:
            return self._landed.get(transfer_id)

    def add_op(self, op: str, handler: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Serve side-channel requests ``{"op": op, ...}`` with ``handler`` (on the side channel's thread;
        it must not block)."""
        self._ops[op] = handler

    def gone(self, transfer_id: str) -> str | None:
        """Why ``transfer_id`` will never be loaded here (the sender dropped it, its lease ran out, it
        failed), or None: it landed, or may still land."""
        with self._lock:
            return self._gone.get(transfer_id)

    def early_layers(self, transfer_id: str) -> int:
        """How many layers of ``transfer_id`` are decoded and waiting for its load."""
        with self._lock:
            entry = self._predecoded.get(transfer_id)
            return sum(len(group) for group in entry.layers.values()) if entry is not None else 0

    def landed_ids(self) -> list[str]:
        """Transfers landed and not yet released, oldest first."""
        with self._lock:
            return list(self._landed)

    def decode_layers(self, incoming: IncomingTransfer) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Decode each layer's K and V from the arena, in layer order (layers decoded early come as they
        are); ValueError on a malformed payload."""
        for position, slot in enumerate(incoming.manifest["slots"]):
            with self._lock:
                entry = self._predecoded.get(incoming.transfer_id)
                early = entry.layers.pop(position, None) if entry is not None else None
                if entry is not None and early is not None:
                    size = sum(raw_nbytes(slot[name]) for name in ("k", "v"))
                    entry.nbytes -= size
                    self._predecoded_bytes -= size
            layers = (
                early
                if early is not None
                else decode_slot(self._transport.buffer, incoming.transfer_id, incoming.region, slot)
            )
            for offset, (key, value) in enumerate(layers):
                yield int(slot["index"]) + offset, key, value

    def release(
        self, transfer_id: str, *, decode_s: float | None = None, error: str = "", record: bool = True
    ) -> None:
        """Free a landed (or reserved) transfer. With ``decode_s`` it was loaded: its SUCCESS record is
        emitted (its ``decode_s`` adds the seconds spent decoding layers early); otherwise it ends ABORTED
        (or FAILED with ``error``). Idempotent."""
        if error:
            outcome = TransferOutcome.FAILED
        else:
            outcome = TransferOutcome.SUCCESS if decode_s is not None else TransferOutcome.ABORTED
        with self._lock:
            self._arena.release(transfer_id)
            self._end_incoming(transfer_id, outcome, decode_s or 0.0, error, record=record)

    def renew(self, transfer_ids: list[str]) -> list[str]:
        """Give the landed transfers among ``transfer_ids`` a fresh lease: their requests still wait in the
        engine's queue for their turn to load. Returns the ids held here no more (never landed, expired or
        released)."""
        self.expire()
        now, lost = self._clock(), []
        with self._lock:
            for transfer_id in transfer_ids:
                incoming = self._landed.get(transfer_id)
                if incoming is None:
                    lost.append(transfer_id)
                    continue
                self._arena.reserve(transfer_id, incoming.region.nbytes, now=now, lease_s=self._lease_s)
        return lost

    def expire(self) -> None:
        """End every transfer whose lease ran out (sender died, or nobody came to load it)."""
        with self._lock:
            for key in self._arena.expire(self._clock()):
                why = "lease expired before the transfer was loaded"
                self._end_incoming(key, TransferOutcome.ABORTED, 0.0, why, record=True)

    def _end_incoming(
        self, transfer_id: str, outcome: TransferOutcome, decode_s: float, error: str, *, record: bool
    ) -> None:
        """Forget a receiver-side transfer and emit its one record (the caller holds the lock). A landed
        transfer's record is the sender's, from the manifest, completed here."""
        incoming = self._landed.pop(transfer_id, None)
        request_id = self._incoming.pop(transfer_id, None)
        self._quiet.discard(transfer_id)
        early = self._predecoded.pop(transfer_id, None)
        if early is not None:
            self._predecoded_bytes -= early.nbytes
            decode_s += early.seconds
        if outcome is not TransferOutcome.SUCCESS:
            self._gone[transfer_id] = error or outcome.value
            while len(self._gone) > _GONE_KEPT:
                self._gone.popitem(last=False)
        if not record:
            return
        if incoming is not None:
            sent = TransferRecord.from_dict(incoming.manifest["record"])
            self._records.append(replace(sent, decode_s=decode_s, outcome=outcome, error=error))
        elif request_id is not None:
            self._records.append(TransferRecord(transfer_id, request_id, outcome, error=error))

    def drain_records(self) -> list[TransferRecord]:
        with self._lock:
            records, self._records = self._records, []
        return records

    @property
    def held(self) -> dict[str, int]:
        """Leak-check figures: staging regions held, landed and reserved transfers, transfers with layers
        decoded early (after ending those whose lease ran out)."""
        self.expire()
        with self._lock:
            return {
                "regions": len(self._arena.keys),
                "landed": len(self._landed),
                "reserved": len(self._incoming),
                "predecoded": len(self._predecoded),
                "pulls": self._puller.running(),
            }

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._decoder is not None:
            self._decoder.join(timeout=2.0)
        self._server.close()
        self._puller.close()
        for client in self._clients.values():
            client.close()
        self._transport.close()

    # ---- side channel (its own thread) ----

    def _handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        transfer_id = str(msg.get("transfer_id", ""))
        if op == "reserve":
            self.expire()  # an idle engine never calls ``take``: free lapsed regions before taking room
            peer = peer_from_wire(msg["peer"])
            self._transport.add_peer(peer)
            with self._lock:
                region = self._arena.reserve(
                    transfer_id, int(msg["nbytes"]), now=self._clock(), lease_s=self._lease_s
                )
                self._incoming[transfer_id] = str(msg["request_id"])
                if msg.get("notes") is False:
                    self._quiet.add(transfer_id)
            self._wake.set()
            return {"offset": region.offset, "peer": peer_to_wire(self._transport.peer_info())}
        if op == "commit":
            return {"bad": self._commit(transfer_id, msg["manifest"])}
        if op == "abort":
            # The sender records the failure it aborts for; this side only frees (once it reads no more).
            self._puller.stop(transfer_id)
            self.release(transfer_id, error=str(msg.get("why", "aborted by the sender")), record=False)
            return {}
        extra = self._ops.get(str(op))
        if extra is not None:
            return extra(msg)
        raise ValueError(f"unknown side-channel op {op!r}")

    def _hold(self, transfer_id: str) -> Region | None:
        """A reserved transfer's region with a fresh lease (a pull reads into it), or None."""
        with self._lock:
            if (region := self._arena.region(transfer_id)) is None or transfer_id not in self._incoming:
                return None
            return self._arena.reserve(transfer_id, region.nbytes, now=self._clock(), lease_s=self._lease_s)

    def _commit(self, transfer_id: str, manifest: dict[str, Any]) -> list[int]:
        with self._lock:
            region = self._arena.region(transfer_id)
            request_id = self._incoming.get(transfer_id)
            if region is None or request_id is None:
                raise ValueError(f"transfer {transfer_id} has no reservation here (expired or aborted)")
            bad = []
            early = self._predecoded.get(transfer_id)
            checked = early.verified if early is not None else {}
            for i, slot in enumerate(manifest["slots"]):
                offset, nbytes = int(slot["offset"]), int(slot["nbytes"])
                if offset < 0 or offset + nbytes > region.nbytes:
                    raise ValueError(
                        f"transfer {transfer_id}: layer {i} at {offset}+{nbytes} leaves its region"
                    )
                if (
                    "sum" in slot
                    and checked.get(i) != (offset, nbytes, slot["sum"])
                    and slot_sum(self._transport.buffer, region.offset + offset, nbytes) != slot["sum"]
                ):
                    bad.append(i)
            if bad:
                return bad
            del self._incoming[transfer_id]
            self._quiet.discard(transfer_id)
            self._landed[transfer_id] = IncomingTransfer(transfer_id, request_id, region, manifest)
            # Loading waits for the decode engine to schedule the request: give it a fresh lease.
            self._arena.reserve(transfer_id, region.nbytes, now=self._clock(), lease_s=self._lease_s)
        return []

    # ---- early decoding (its own thread) ----

    def _predecode_loop(self) -> None:
        """Decode each compressed layer as its notification comes; poll often only while a transfer whose
        layers come with one is reserved here (an idle engine's process keeps its core, as does a pull's)."""
        while not self._closed.is_set():
            with self._lock:
                expecting = any(t not in self._quiet for t in self._incoming)
            if not expecting:
                self._wake.wait(0.5)
                self._wake.clear()
            notes = self._transport.notifications()
            for note in notes:
                try:
                    self._predecode(note)
                except Exception as exc:  # the load decodes (and reports) whatever failed here
                    log.debug("early decode of a layer failed: %s", exc)
            if expecting and not notes:
                time.sleep(_PREDECODE_POLL_S)

    def _predecode(self, note: bytes) -> None:
        """Decode the slot ``note`` announces if its transfer is still here, the budget allows and its
        bytes pass their checksum (a notification may beat its bytes; the commit's check stands then)."""
        if not note.startswith(LAYER_NOTE):
            return
        body = json.loads(note[len(LAYER_NOTE) :])
        transfer_id, position, slot = str(body["t"]), int(body["p"]), body["s"]
        if "sum" not in slot:
            return
        size = sum(raw_nbytes(slot[name]) for name in ("k", "v"))
        with self._lock:
            region = self._arena.region(transfer_id)
            if region is None or self._predecoded_bytes + size > self._predecode_budget:
                return
            if transfer_id not in self._incoming and transfer_id not in self._landed:
                return
            entry = self._predecoded.setdefault(transfer_id, _Predecoded())
            entry.nbytes += size
            self._predecoded_bytes += size
        started = time.perf_counter()
        offset, nbytes, digest = int(slot["offset"]), int(slot["nbytes"]), int(slot["sum"])
        layers = None
        try:
            if (
                offset + nbytes <= region.nbytes
                and slot_sum(self._transport.buffer, region.offset + offset, nbytes) == digest
            ):
                layers = decode_slot(self._transport.buffer, transfer_id, region, slot)
        finally:
            with self._lock:
                if self._predecoded.get(transfer_id) is entry:  # else it ended meanwhile, budget returned
                    entry.seconds += time.perf_counter() - started
                    if layers is None:
                        entry.nbytes -= size
                        self._predecoded_bytes -= size
                    else:
                        entry.layers[position] = layers
                        entry.verified[position] = (offset, nbytes, digest)

    # ---- helpers ----

    def _client(self, destination: str) -> SideChannelClient:
        """This thread's client to ``destination``: a side-channel socket serves one thread only."""
        key = (threading.get_ident(), destination)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = SideChannelClient(destination)
        return client

    def _record_failed(
        self, transfer_id: str, request_id: str, codec: str, reason: str, exc: BaseException, peer: str = ""
    ) -> TransferRecord:
        error = f"KV transfer {transfer_id} failed: {exc}"
        record = TransferRecord(
            transfer_id,
            request_id,
            TransferOutcome.FAILED,
            codec=codec,
            reason=reason,
            error=error,
            peer=peer,
        )
        with self._lock:
            self._records.append(record)
        return record
