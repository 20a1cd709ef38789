"""The save path of ``PdflowConnector``'s worker half (prefill side), in vLLM's worker process: as soon as the
forward pass has computed a layer of a request that hands off (``save_layer``), the request's K and V for
that layer leave for the decode worker: encoded with the codec the chooser picked for the link and staged, or,
with codec ``none`` and a registered KV cache, named as spans of the cache itself. ``wait_for_save`` (end of
the step) waits for the tail and commits, so the prefill step returns with the KV landed. A failed transfer
never fails the step: its request's record says what happened.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import torch

from kv_transfer.codec import get_codec
from kv_transfer.exchange.endpoint import KVEndpoint, TransferFailed
from kv_transfer.exchange.outgoing import OutgoingTransfer
from kv_transfer.vllm.block_push import block_kv
from kv_transfer.vllm.codec_chooser import CodecChooser
from kv_transfer.vllm.meta import PdflowConnectorMetadata, SaveSpec
from kv_transfer.vllm.paged import PagedLayout, block_format, gather
from protocol.transfers import TransferOutcome, TransferRecord

log = logging.getLogger(__name__)


class KVSaver:
    def __init__(
        self,
        endpoint: KVEndpoint,
        layers: dict[str, torch.Tensor],
        layout: PagedLayout,
        chooser: CodecChooser,
        *,
        zero_copy: bool,
    ) -> None:
        """``layers``: the KV cache by layer name, in layer order; ``zero_copy``: registered with the
        endpoint's transport, so raw hand-offs send straight from it."""
        self._endpoint = endpoint
        self._layers = layers
        self._index = {name: i for i, name in enumerate(layers)}
        self._layout = layout
        self._chooser = chooser
        self._zero_copy = zero_copy
        self._sending: dict[str, OutgoingTransfer] = {}
        self._failed: set[str] = set()
        self.records: list[dict[str, Any]] = []  # ended hand-offs, until the connector stats take them

    def save_layer(self, meta: PdflowConnectorMetadata, layer_name: str, kv_layer: torch.Tensor) -> None:
        """Send layer ``layer_name`` of every request this step saves. Called by the forward pass right
        after computing the layer; never raises (a failed transfer is recorded, the step goes on)."""
        index = self._index[layer_name]
        for rid, spec in meta.saves.items():
            if rid in self._failed:
                continue
            try:
                transfer = self._sending.get(rid)
                if transfer is None:
                    transfer = self._sending[rid] = self._open(rid, spec)
                blocks = spec.block_ids[: -(-spec.tokens // self._layout.block_size)]
                if self._sends_blocks(transfer):
                    layer = self._layers[layer_name]
                    self._endpoint.send_layer_from(transfer, index, *block_kv(layer, self._layout, blocks))
                else:
                    key, value = gather(kv_layer, self._layout, blocks)
                    self._endpoint.send_layer(transfer, index, key, value, hold=True)  # copies
            except TransferFailed as exc:
                self._fail(rid, exc.record.to_dict())
            except Exception as exc:  # never let a transfer problem kill the engine step
                log.warning("pdflow: sending layer %s of %s failed: %s", layer_name, rid, exc)
                self._failed.add(rid)
                if (t := self._sending.pop(rid, None)) is not None:
                    self._endpoint.abort(t, str(exc))
                error = f"KV transfer {spec.transfer_id} failed: {exc}"
                self.records.append(
                    TransferRecord(spec.transfer_id, rid, TransferOutcome.FAILED, error=error).to_dict()
                )

    def wait_for_save(self) -> None:
        """End of the step: finish every transfer it started (the tail of the writes, the commit), learn the
        link's bandwidth and the codec's speed from each."""
        done_computing = time.monotonic()
        for rid, transfer in self._sending.items():
            try:
                record = self._endpoint.finish(transfer, compute_done_at=done_computing)
                self._chooser.observe(
                    transfer.destination,  # the address the chooser keys links by, as in _open
                    record.wire_bytes,
                    record.wire_s,
                    codec=transfer.codec.name,
                    raw_bytes=record.raw_bytes,
                    encode_s=record.encode_s,
                )
                if self._sends_blocks(transfer):
                    record = replace(record, block_format=self.block_format())
                self.records.append(record.to_dict())
            except TransferFailed as exc:
                log.warning("pdflow: transfer of %s failed: %s", rid, exc)
                self.records.append(exc.record.to_dict())
        self._sending.clear()
        self._failed.clear()

    def block_format(self) -> str:
        return block_format(self._layout, next(iter(self._layers.values())).dtype)

    def _open(self, rid: str, spec: SaveSpec) -> OutgoingTransfer:
        dtype = next(iter(self._layers.values())).dtype
        tokens = self._layout.padded(spec.tokens)
        raw = tokens * self._layout.token_bytes(dtype) * len(self._layers)
        choice = self._chooser.choose(spec.destination, raw, override=spec.codec)
        return self._endpoint.open(
            spec.transfer_id,
            rid,
            spec.destination,
            layers=len(self._layers),
            raw_bytes=raw,
            tokens=tokens,
            codec=get_codec(choice.codec, **self._chooser.options(choice.codec)),
            reason=choice.reason,
        )

    def _sends_blocks(self, transfer: OutgoingTransfer) -> bool:
        """A hand-off with codec ``none`` goes out as raw block images straight from the registered KV cache,
        as vLLM's NixlConnector moves it: no gather, no staging copy, no checksum."""
        return self._zero_copy and not transfer.codec.compresses

    def _fail(self, rid: str, record: dict[str, Any]) -> None:
        self._failed.add(rid)
        self._sending.pop(rid, None)
        self.records.append(record)
