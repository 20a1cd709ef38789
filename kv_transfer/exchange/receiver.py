"""The receiving half of a worker's KV exchange: transfers reserved in its staging arena, checked at commit,
and kept landed until the engine loads them (``take`` + ``decode_layers``, then ``release``) or their lease
runs out. Every incoming transfer ends here in exactly one record: the sender's, completed with the decode
seconds, when it was loaded; ABORTED or FAILED otherwise.

``reserve``, ``commit`` and ``abort`` are side-channel operations (the side channel's thread); ``take``,
``decode_layers``, ``release``, ``renew`` and ``expire`` come from the engine's thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from kv_transfer.exchange.predecode import EarlyDecoder
from kv_transfer.exchange.staging import Staging
from kv_transfer.exchange.wire import decode_slot, peer_from_wire, peer_to_wire, slot_sum
from kv_transfer.transport.arena import Region
from protocol.kv_ops import Commit, Committed, Reserve, Reserved
from protocol.transfers import TransferOutcome, TransferRecord

_GONE_KEPT = 4096  # ended transfers remembered for ``gone``


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


class Receiver:
    def __init__(self, staging: Staging, *, predecode_bytes: int) -> None:
        self._staging = staging
        self._landed: dict[str, IncomingTransfer] = {}
        self._incoming: dict[str, str] = {}  # reserved, not yet committed: transfer id -> request id
        self._quiet: set[str] = set()  # of those, the ones whose layers come with no notification to decode
        # transfers that ended here without being loaded (dropped by the sender, expired, failed), so that a
        # load waiting for one can fail at once: transfer id -> why; the newest _GONE_KEPT
        self._gone: OrderedDict[str, str] = OrderedDict()
        self.early = EarlyDecoder(staging, predecode_bytes, region=self._present, expecting=self._expecting)

    # ---- side channel ----

    def reserve(self, op: Reserve) -> Reserved:
        """Room for an incoming transfer (the same region again if it holds one: a retried handshake)."""
        self.expire()  # an idle engine never calls ``take``: free lapsed regions before taking room
        transport = self._staging.transport
        transport.add_peer(peer_from_wire(op.peer))
        with self._staging.lock:
            region = self._staging.lease(op.transfer_id, op.nbytes)
            self._incoming[op.transfer_id] = op.request_id
            if not op.notes:
                self._quiet.add(op.transfer_id)
        self.early.wake()
        return Reserved(region.offset, peer_to_wire(transport.peer_info()))

    def commit(self, op: Commit) -> Committed:
        """Check every slot of the manifest against the reservation (bounds, checksums); land the transfer,
        or name the corrupt slots for the sender to write again."""
        transfer_id, manifest = op.transfer_id, op.manifest
        buffer = self._staging.transport.buffer
        with self._staging.lock:
            region = self._staging.arena.region(transfer_id)
            request_id = self._incoming.get(transfer_id)
            if region is None or request_id is None:
                raise ValueError(f"transfer {transfer_id} has no reservation here (expired or aborted)")
            bad = []
            checked = self.early.verified(transfer_id)
            for i, slot in enumerate(manifest["slots"]):
                offset, nbytes = int(slot["offset"]), int(slot["nbytes"])
                if offset < 0 or offset + nbytes > region.nbytes:
                    raise ValueError(
                        f"transfer {transfer_id}: layer {i} at {offset}+{nbytes} leaves its region"
                    )
                if (
                    "sum" in slot
                    and checked.get(i) != (offset, nbytes, slot["sum"])
                    and slot_sum(buffer, region.offset + offset, nbytes) != slot["sum"]
                ):
                    bad.append(i)
            if bad:
                return Committed(bad)
            del self._incoming[transfer_id]
            self._quiet.discard(transfer_id)
            self._landed[transfer_id] = IncomingTransfer(transfer_id, request_id, region, manifest)
            # Loading waits for the decode engine to schedule the request: give it a fresh lease.
            self._staging.lease(transfer_id, region.nbytes)
        return Committed()

    def hold(self, transfer_id: str) -> Region | None:
        """A reserved transfer's region with a fresh lease (a pull reads into it), or None."""
        with self._staging.lock:
            region = self._staging.arena.region(transfer_id)
            if region is None or transfer_id not in self._incoming:
                return None
            return self._staging.lease(transfer_id, region.nbytes)

    # ---- engine thread ----

    def take(self, transfer_id: str) -> IncomingTransfer | None:
        """The landed transfer, or None if it has not landed (yet). Never blocks."""
        self.expire()
        with self._staging.lock:
            return self._landed.get(transfer_id)

    def gone(self, transfer_id: str) -> str | None:
        """Why ``transfer_id`` will never be loaded here (the sender dropped it, its lease ran out, it
        failed), or None: it landed, or may still land."""
        with self._staging.lock:
            return self._gone.get(transfer_id)

    def early_layers(self, transfer_id: str) -> int:
        """How many layers of ``transfer_id`` are decoded and waiting for its load."""
        with self._staging.lock:
            return self.early.count(transfer_id)

    def landed_ids(self) -> list[str]:
        """Transfers landed and not yet released, oldest first."""
        with self._staging.lock:
            return list(self._landed)

    def decode_layers(self, incoming: IncomingTransfer) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Decode each layer's K and V from the arena, in layer order (layers decoded early come as they
        are); ValueError on a malformed payload."""
        buffer = self._staging.transport.buffer
        for position, slot in enumerate(incoming.manifest["slots"]):
            with self._staging.lock:
                early = self.early.pop(incoming.transfer_id, position, slot)
            layers = (
                early
                if early is not None
                else decode_slot(buffer, incoming.transfer_id, incoming.region, slot)
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
        with self._staging.lock:
            self._staging.arena.release(transfer_id)
            self._end(transfer_id, outcome, decode_s or 0.0, error, record=record)

    def renew(self, transfer_ids: list[str]) -> list[str]:
        """Give the landed transfers among ``transfer_ids`` a fresh lease: their requests still wait in the
        engine's queue for their turn to load. Returns the ids held here no more (never landed, expired or
        released)."""
        self.expire()
        lost = []
        with self._staging.lock:
            for transfer_id in transfer_ids:
                incoming = self._landed.get(transfer_id)
                if incoming is None:
                    lost.append(transfer_id)
                    continue
                self._staging.lease(transfer_id, incoming.region.nbytes)
        return lost

    def expire(self) -> None:
        """End every transfer whose lease ran out (sender died, or nobody came to load it)."""
        with self._staging.lock:
            for key in self._staging.arena.expire(self._staging.clock()):
                why = "lease expired before the transfer was loaded"
                self._end(key, TransferOutcome.ABORTED, 0.0, why, record=True)

    def held(self) -> dict[str, int]:
        """Leak-check figures (the caller expired lapsed transfers first)."""
        with self._staging.lock:
            return {
                "landed": len(self._landed),
                "reserved": len(self._incoming),
                "predecoded": self.early.held,
            }

    def close(self) -> None:
        self.early.close()

    # ---- helpers (lock held) ----

    def _present(self, transfer_id: str) -> Region | None:
        if transfer_id not in self._incoming and transfer_id not in self._landed:
            return None
        return self._staging.arena.region(transfer_id)

    def _expecting(self) -> bool:
        return any(t not in self._quiet for t in self._incoming)

    def _end(
        self, transfer_id: str, outcome: TransferOutcome, decode_s: float, error: str, *, record: bool
    ) -> None:
        """Forget a receiver-side transfer and emit its one record. A landed transfer's record is the
        sender's, from the manifest, completed here."""
        incoming = self._landed.pop(transfer_id, None)
        request_id = self._incoming.pop(transfer_id, None)
        self._quiet.discard(transfer_id)
        decode_s += self.early.forget(transfer_id)
        if outcome is not TransferOutcome.SUCCESS:
            self._gone[transfer_id] = error or outcome.value
            while len(self._gone) > _GONE_KEPT:
                self._gone.popitem(last=False)
        if not record:
            return
        if incoming is not None:
            sent = TransferRecord.from_dict(incoming.manifest["record"])
            self._staging.records.append(replace(sent, decode_s=decode_s, outcome=outcome, error=error))
        elif request_id is not None:
            self._staging.records.append(TransferRecord(transfer_id, request_id, outcome, error=error))
