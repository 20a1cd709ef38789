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

The endpoint is the front of three parts: ``Sender`` (``sender.py``), ``Receiver`` (``receiver.py``, with the
early decoding of ``predecode.py``) and ``Puller`` (``pull.py``), which share one ``Staging``. Sending calls
come from the thread that sends; the side channel serves the receiving half from its own thread; ``take``,
``decode_layers`` and ``release`` come from the engine's thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from kv_transfer.codec import KVCodec
from kv_transfer.exchange.outgoing import OutgoingTransfer, RegisteredKV
from kv_transfer.exchange.pull import Puller
from kv_transfer.exchange.receiver import IncomingTransfer, Receiver
from kv_transfer.exchange.sender import Sender, TransferFailed
from kv_transfer.exchange.staging import Staging
from kv_transfer.transport.base import Transport
from kv_transfer.transport.side_channel import SideChannelServer
from protocol.kv_ops import Abort, Commit, Done, Pull, PullStatus, Reserve, parse_op, reply_to_wire
from protocol.transfers import TransferRecord

__all__ = ["IncomingTransfer", "KVEndpoint", "TransferFailed"]

Handler = Callable[[Any], Any]


class KVEndpoint:
    """One per worker process."""

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
        secret: bytes | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``predecode_bytes``: decoded layers held ahead of their load, at most (default: the staging
        buffer's size; 0 turns early decoding off). ``secret``: the cluster secret, which signs the side
        channel's messages both ways (None: unsigned, loopback only)."""
        self._staging = Staging(transport, clock, lease_s)
        budget = transport.buffer.numel() if predecode_bytes is None else predecode_bytes
        self._receiver = Receiver(self._staging, predecode_bytes=budget)
        self._sender = Sender(self._staging, timeout_s=timeout_s, checksum=checksum, secret=secret)
        self._puller = Puller(
            transport, self._receiver.hold, timeout_s=timeout_s
        )  # transfers this side reads
        self._handlers: dict[type[Any], Handler] = {
            Reserve: self._receiver.reserve,
            Commit: self._receiver.commit,
            Abort: self._abort_incoming,
            Pull: self._puller.start,
            PullStatus: self._puller.status,
        }
        self._server = SideChannelServer(self._handle, host=host, port=port, secret=secret)
        self.address = self._server.address

    @property
    def transport(self) -> Transport:
        return self._staging.transport

    def add_op(self, op: type[Any], handler: Handler) -> None:
        """Serve side-channel operation ``op`` (a class of ``protocol.kv_ops``) with ``handler``, which
        returns its reply (on the side channel's thread; it must not block)."""
        self._handlers[op] = handler

    # ---- sending (see ``Sender``) ----

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
        return self._sender.open(
            transfer_id,
            request_id,
            destination,
            layers=layers,
            raw_bytes=raw_bytes,
            tokens=tokens,
            codec=codec,
            reason=reason,
        )

    def send_layer(
        self, t: OutgoingTransfer, index: int, key: torch.Tensor, value: torch.Tensor, *, hold: bool = False
    ) -> None:
        self._sender.send_layer(t, index, key, value, hold=hold)

    def send_layer_from(
        self, t: OutgoingTransfer, index: int, key: RegisteredKV, value: RegisteredKV
    ) -> None:
        self._sender.send_layer_from(t, index, key, value)

    def send_layers_from(
        self, t: OutgoingTransfer, layers: Iterable[tuple[int, RegisteredKV, RegisteredKV]]
    ) -> None:
        self._sender.send_layers_from(t, layers)

    def finish(
        self,
        t: OutgoingTransfer,
        *,
        compute_done_at: float | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> TransferRecord:
        return self._sender.finish(t, compute_done_at=compute_done_at, before_commit=before_commit)

    def abort(self, t: OutgoingTransfer, why: str) -> None:
        self._sender.abort(t, why)

    def drop_remote(self, destination: str, transfer_ids: list[str], why: str) -> None:
        self._sender.drop_remote(destination, transfer_ids, why)

    def probe(self, destination: str, nbytes: int = 8 << 20) -> float:
        return self._sender.probe(destination, nbytes)

    # ---- receiving (see ``Receiver``) ----

    def take(self, transfer_id: str) -> IncomingTransfer | None:
        return self._receiver.take(transfer_id)

    def gone(self, transfer_id: str) -> str | None:
        return self._receiver.gone(transfer_id)

    def early_layers(self, transfer_id: str) -> int:
        return self._receiver.early_layers(transfer_id)

    def landed_ids(self) -> list[str]:
        return self._receiver.landed_ids()

    def decode_layers(self, incoming: IncomingTransfer) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        return self._receiver.decode_layers(incoming)

    def release(
        self, transfer_id: str, *, decode_s: float | None = None, error: str = "", record: bool = True
    ) -> None:
        self._receiver.release(transfer_id, decode_s=decode_s, error=error, record=record)

    def renew(self, transfer_ids: list[str]) -> list[str]:
        return self._receiver.renew(transfer_ids)

    def expire(self) -> None:
        self._receiver.expire()

    # ---- both ----

    def drain_records(self) -> list[TransferRecord]:
        """The records of transfers that ended here since the last call."""
        return self._staging.drain_records()

    @property
    def held(self) -> dict[str, int]:
        """Leak-check figures: staging regions held, landed and reserved transfers, transfers with layers
        decoded early, pulls (after ending those whose lease ran out)."""
        self._receiver.expire()
        with self._staging.lock:
            regions = len(self._staging.arena.keys)
        return {"regions": regions, **self._receiver.held(), "pulls": self._puller.running()}

    def close(self) -> None:
        self._receiver.close()
        self._server.close()
        self._puller.close()
        self._sender.close()
        self._staging.transport.close()

    def _abort_incoming(self, op: Abort) -> Done:
        # The sender records the failure it aborts for; this side only frees (once it reads no more).
        self._puller.stop(op.transfer_id)
        self._receiver.release(op.transfer_id, error=op.why, record=False)
        return Done()

    def _handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = parse_op(msg)
        handler = self._handlers.get(type(op))
        if handler is None:
            raise ValueError(f"side-channel op {op.OP!r} is not served here")
        return reply_to_wire(handler(op))
