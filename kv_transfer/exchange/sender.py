"""The sending half of a worker's KV exchange: open a transfer (a reservation on the receiver and one here),
stage and send its layers, and finish it (wait for the last write or read, commit, one resend of a corrupt
layer) or abort it. Calls come from one sending thread per transfer (the engine's, or a push thread); each
thread has its own side-channel socket per peer."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import torch

from kv_transfer.codec import KVCodec, get_codec
from kv_transfer.exchange.outgoing import OutgoingTransfer, RegisteredKV, wire_bound
from kv_transfer.exchange.staging import Staging
from kv_transfer.exchange.wire import peer_from_wire, peer_to_wire, slot_layers
from kv_transfer.transport.side_channel import SideChannelClient, SideChannelError, SideChannelTimeout
from protocol.kv_config import KVCodecKind
from protocol.kv_ops import Abort, Commit, Reserve
from protocol.transfers import TransferOutcome, TransferRecord

log = logging.getLogger(__name__)
# A peer that missed a deadline is not asked again for this long: every transfer to it fails at once rather
# than each waiting out its own deadline inside the engine's step, holding up the requests batched with it.
# By then the controller has marked a stopped peer DEAD (heartbeat timeout) and routes nothing to it.
STALLED_PEER_S = 5.0


class TransferFailed(Exception):
    """The transfer did not land; ``record`` says where it stopped."""

    def __init__(self, record: TransferRecord) -> None:
        super().__init__(record.error)
        self.record = record


class Sender:
    def __init__(
        self, staging: Staging, *, timeout_s: float, checksum: bool, secret: bytes | None = None
    ) -> None:
        self._staging = staging
        self._secret = secret  # signs the side-channel requests (the cluster secret)
        self._timeout_s = timeout_s
        self._checksum = checksum
        self._clients: dict[tuple[int, str], SideChannelClient] = {}  # per sending thread and peer
        self._stalled_at: dict[str, float] = {}  # peer -> when it last missed a deadline

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
        record: bool = True,
    ) -> OutgoingTransfer:
        """Reserve room on ``destination`` (a side-channel address) and here. Blocks for one round trip
        (deadline ``timeout_s``); raises ``TransferFailed`` if the peer refuses or cannot be reached (its
        FAILED record is kept for the engine's figures unless ``record`` is off: a link probe)."""
        nbytes = wire_bound(raw_bytes, layers)
        client = self._client(destination)
        transport = self._staging.transport
        mine = transport.peer_info()
        try:
            self._not_stalled(destination)
            # only a compressed layer's write notifies its landing
            ask = Reserve(transfer_id, request_id, nbytes, peer_to_wire(mine), notes=codec.compresses)
            reply = client.ask(ask, timeout_s=min(self._timeout_s, 5.0))
            peer = peer_from_wire(reply.peer)
            transport.add_peer(peer)
            with self._staging.lock:
                local = self._staging.lease(transfer_id, nbytes)
        except Exception as exc:  # unreachable peer, refused reservation, full arena, bad metadata
            self._note_stall(destination, exc)
            failed = self._record_failed(transfer_id, request_id, codec.name, reason, exc, keep=record)
            raise TransferFailed(failed) from exc
        return OutgoingTransfer(
            transfer_id,
            request_id,
            codec,
            reason,
            peer.name,
            client,
            local,
            reply.offset,
            layers,
            tokens,
            transport=transport,
            clock=self._staging.clock,
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
        if hold and t.codec.compresses:
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
        record on any error (the receiver's reservation is released: by an Abort, or by its lease where the
        receiver missed a deadline and is not asked again)."""
        clock = self._staging.clock
        done_computing = compute_done_at if compute_done_at is not None else clock()
        retries = 0
        try:
            self._not_stalled(t.destination)
            t.flush(checksum=self._checksum)
            if t.layers_staged != t.layers:
                raise ValueError(f"{t.layers_staged} of {t.layers} layers were sent")
            t.drain()
            if before_commit is not None:
                before_commit()
            landed_at = clock()
            while True:
                sent = t.sent_record(retries, landed_at, done_computing)
                manifest = {
                    "tokens": t.tokens,
                    "retries": retries,
                    "record": sent.to_dict(),
                    "slots": t.slots,
                }
                reply = t.client.ask(Commit(t.transfer_id, manifest), timeout_s=min(self._timeout_s, 10.0))
                if not reply.bad:
                    break
                layers = slot_layers(t.slots, reply.bad)
                if retries >= 1:
                    raise ValueError(f"layers {layers} arrived corrupt twice (checksum mismatch)")
                retries += 1
                log.warning("transfer %s: layers %s corrupt on arrival; sending again", t.transfer_id, layers)
                t.queued.extend(int(i) for i in reply.bad)
                t.drain()
                landed_at = clock()
        except Exception as exc:
            self._note_stall(t.destination, exc)
            self.abort(t, str(exc))
            failed = self._record_failed(t.transfer_id, t.request_id, t.codec.name, t.reason, exc, t.peer)
            raise TransferFailed(failed) from exc
        finally:
            for _, xfer in t.xfers:
                xfer.release()
        with self._staging.lock:
            self._staging.arena.release(t.transfer_id)
        return sent

    def abort(self, t: OutgoingTransfer, why: str) -> None:
        """Best effort: release both reservations (the receiver's lease frees it anyway if this is lost)."""
        with self._staging.lock:
            self._staging.arena.release(t.transfer_id)
        try:
            self._not_stalled(t.destination)
            t.client.ask(Abort(t.transfer_id, why), timeout_s=1.0)
        except SideChannelError as exc:
            self._note_stall(t.destination, exc)
            log.info("abort of transfer %s not delivered: %s", t.transfer_id, exc)

    def _not_stalled(self, destination: str) -> None:
        """``SideChannelError`` at once if ``destination`` missed a deadline within ``STALLED_PEER_S``."""
        since = self._staging.clock() - self._stalled_at.get(destination, -STALLED_PEER_S)
        if since < STALLED_PEER_S:
            raise SideChannelError(
                f"{destination} missed a deadline {since:.1f} s ago: not asked again for {STALLED_PEER_S:g} s"
            )

    def _note_stall(self, destination: str, exc: BaseException) -> None:
        if isinstance(exc, SideChannelTimeout):
            self._stalled_at[destination] = self._staging.clock()

    def drop_remote(self, destination: str, transfer_ids: list[str], why: str) -> None:
        """Best effort: free transfers this side pushed to ``destination`` that nobody will load (a migration
        that gave up after some stages landed). Their leases free them anyway if this is lost."""
        client = self._client(destination)
        for transfer_id in transfer_ids:
            try:
                client.ask(Abort(transfer_id, why), timeout_s=1.0)
            except SideChannelError as exc:
                log.info("drop of transfer %s on %s not delivered: %s", transfer_id, destination, exc)

    def probe(self, destination: str, nbytes: int = 8 << 20) -> float:
        """Wire bandwidth to ``destination`` in bytes/s: one raw write of ``nbytes`` into a reservation, which
        is then released. Blocks for the round trip and the write (deadline ``timeout_s``)."""
        nbytes = min(nbytes, self._staging.arena.capacity // 4)
        probe_id = f"probe-{time.monotonic_ns()}"
        t = self.open(
            probe_id,
            probe_id,
            destination,
            layers=1,
            raw_bytes=nbytes,
            tokens=0,
            codec=get_codec("none"),
            record=False,  # a probe that fails is no failed transfer
        )
        clock = self._staging.clock
        started = clock()
        xfer = self._staging.transport.write(t.peer, t.local.offset, t.remote_offset, nbytes)
        try:
            t.wait([(0, xfer)])
            return nbytes / max(clock() - started, 1e-6)
        finally:
            xfer.release()
            self.abort(t, "bandwidth probe")

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    def _client(self, destination: str) -> SideChannelClient:
        """This thread's client to ``destination``: a side-channel socket serves one thread only."""
        key = (threading.get_ident(), destination)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = SideChannelClient(destination, self._secret)
        return client

    def _record_failed(
        self,
        transfer_id: str,
        request_id: str,
        codec: KVCodecKind,
        reason: str,
        exc: BaseException,
        peer: str = "",
        *,
        keep: bool = True,
    ) -> TransferRecord:
        error = f"KV transfer {transfer_id} failed: {exc}"
        record = TransferRecord(
            transfer_id,
            request_id,
            TransferOutcome.FAILED,
            codec=str(codec),
            reason=reason,
            error=error,
            peer=peer,
        )
        if keep:
            self._staging.records.append(record)
        return record
