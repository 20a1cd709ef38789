"""The source side of a live migration, in the engine's worker: push whole blocks of a running request's
KV to another worker's endpoint, as raw block images, on a thread of its own while the engine keeps stepping.
A pre-copy stage (``background``) is paced (``pacing``); the last push, for which the request is paused,
goes at once on a thread of its own. ``PdflowConnector`` owns one ``BlockPusher`` and binds it to its
endpoint and KV cache once they exist; the engine host asks for pushes over the side channel (``Push``,
``PushStatus``)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch

from kv_transfer.codec import KVHeader, KVKind, get_codec
from kv_transfer.exchange.endpoint import KVEndpoint, TransferFailed
from kv_transfer.exchange.outgoing import RegisteredKV
from kv_transfer.exchange.pacing import Pacer
from kv_transfer.vllm.paged import PagedLayout, block_format, block_images, block_spans
from protocol.kv_config import KVCodecKind
from protocol.kv_ops import Push, PushStarted, PushState, PushStatus


class BlockPusher:
    def __init__(self) -> None:
        self._endpoint: KVEndpoint | None = None
        self._layers: dict[str, torch.Tensor] = {}
        self._layout: PagedLayout | None = None
        self._zero_copy = False  # the layers are registered with the transport: pushes send from them
        self._rate: float | None = None  # the pre-copy's cap in bytes a second (``pacing``)
        self._pull = False  # pre-copy stages are read by the destination (``kv_transfer.exchange.pull``)
        # Pre-copy pushes are paced, on a thread at the engine's own priority: one below it held the
        # interpreter's lock and UCX's worker spinlock while preempted, which stalled the engine and had
        # NIXL's progress thread spin (80-690 ms of CPU per 4096-token migration at nice 10 or 19). A last
        # push (the request is paused for it) does not wait behind them.
        self._push_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdflow-push")
        self._last_push_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdflow-push-last")
        self._runner_requests: dict[str, Any] | None = None  # the model runner's, once attached
        self._pushes: dict[str, Future[dict[str, Any]]] = {}

    def bind(
        self,
        endpoint: KVEndpoint,
        layers: dict[str, torch.Tensor],
        layout: PagedLayout,
        *,
        zero_copy: bool,
        rate: float | None,
        pull: bool = False,
    ) -> None:
        """The worker's endpoint and KV cache layers (``register_kv_caches``); ``zero_copy``: the layers are
        registered with the endpoint's transport; ``rate``: the pre-copy's cap in bytes a second; ``pull``:
        the destination reads each pre-copy stage out of the registered layers (its CPU copies, not this
        side's), at that rate (needs ``zero_copy``)."""
        self._endpoint, self._layers, self._layout = endpoint, layers, layout
        self._zero_copy, self._rate, self._pull = zero_copy, rate, pull and zero_copy

    def attach(self, requests: dict[str, Any]) -> None:
        """The model runner's request states (``pdflow_attach`` of the worker extension), so that a push
        can find a running request's blocks without waiting for a step."""
        self._runner_requests = requests

    def start(self, op: Push) -> PushStarted:
        """Push blocks ``[first_block, end_block)`` of a running request to ``destination`` on a push thread
        (a ``background`` one at the pre-copy's rate); ``status`` reports how it ended. ``expected`` is the
        block table the earlier stages pushed from: a request preempted since then holds other blocks, and
        the migration must stop. Called on the side channel's thread (op ``Push``, from this worker's own
        host), during a step as well: it only reads the block table, which a running request's only grows.
        A paced push ends no sooner than the reply's ``eta_s``; the reply's ``error`` says why a push could
        not start."""
        request_id, transfer_id = op.request_id, op.transfer_id
        first, end = op.first_block, op.end_block
        if self._runner_requests is None:
            return PushStarted(error="the engine's model runner is not attached to the pdflow connector")
        state = running_state(self._runner_requests, request_id)
        if state is None:
            return PushStarted(error=f"request {request_id} is not running on this engine")
        blocks = [int(b) for b in state.block_ids[0]]
        if blocks[: len(op.expected)] != [int(b) for b in op.expected]:
            return PushStarted(
                error=f"request {request_id} was preempted since the last stage (its blocks changed)"
            )
        if not 0 <= first <= end <= len(blocks):
            return PushStarted(error=f"blocks [{first}, {end}) of {request_id}: it holds {len(blocks)}")
        held = blocks[:end]

        def unchanged() -> bool:  # still this request's blocks: nothing could have been written over them
            now = running_state(self._runner_requests or {}, request_id)
            return now is state and [int(b) for b in state.block_ids[0][:end]] == held

        background = op.background
        self._pushes[transfer_id] = (self._push_pool if background else self._last_push_pool).submit(
            self._push,
            request_id,
            transfer_id,
            op.destination,
            blocks[first:end],
            unchanged,
            self._rate if background else None,
            background and self._pull,
        )
        eta_s = 0.0  # a paced push cannot end before its last layer starts: no use asking about it sooner
        if background and self._rate and self._layout is not None and self._layers:
            dtype = next(iter(self._layers.values())).dtype
            layer_bytes = (end - first) * self._layout.block_size * self._layout.token_bytes(dtype)
            eta_s = layer_bytes * (len(self._layers) - 1) / self._rate
        return PushStarted(held, eta_s)

    def status(self, op: PushStatus) -> PushState:
        """The record of a push once it ended (then forgotten), none while it runs."""
        future = self._pushes.get(op.transfer_id)
        if future is None:
            return PushState({"transfer_id": op.transfer_id, "outcome": "failed", "error": "no such push"})
        if not future.done():
            return PushState(None)
        del self._pushes[op.transfer_id]
        return PushState(dict(future.result()))

    def running(self) -> int:
        """Pushes not ended yet (leak check)."""
        return sum(1 for f in self._pushes.values() if not f.done())

    def shutdown(self) -> None:
        self._push_pool.shutdown(wait=True, cancel_futures=True)
        self._last_push_pool.shutdown(wait=True, cancel_futures=True)

    def _push(
        self,
        request_id: str,
        transfer_id: str,
        destination: str,
        block_ids: list[int],
        unchanged: Callable[[], bool],
        rate: float | None,
        pull: bool = False,
    ) -> dict[str, Any]:
        """Push whole blocks of a request's KV in one transfer: every layer, as raw block images (exact, and
        no reordering on either side; the record's ``block_format`` names the layout). A running request
        never rewrites a full block, nor the slots of tokens it has already produced the next token for; but
        one that ends or is preempted meanwhile gives its blocks back, so once every layer is copied out,
        ``unchanged`` must confirm the blocks are still its own, or the transfer fails. A ``rate`` (bytes a
        second) spreads the layers' sends over time (``pacing``); with ``pull`` the destination reads them, at
        that rate. Returns the record as a dict (FAILED with an error on any failure)."""
        endpoint, layout = self._endpoint, self._layout
        if endpoint is None or layout is None:
            return {"transfer_id": transfer_id, "outcome": "failed", "error": "connector not registered"}
        dtype = next(iter(self._layers.values())).dtype
        tokens = len(block_ids) * layout.block_size
        raw = tokens * layout.token_bytes(dtype) * len(self._layers)
        try:
            transfer = endpoint.open(
                transfer_id,
                request_id,
                destination,
                layers=len(self._layers),
                raw_bytes=raw,
                tokens=tokens,
                codec=get_codec(KVCodecKind.NONE),
                reason="migration: exact copy",
            )
        except TransferFailed as exc:
            return exc.record.to_dict()

        def still_its_own() -> None:
            if not unchanged():
                raise ValueError(f"request {request_id} ended or was preempted during the push")

        try:
            if pull:  # the destination reads every layer, paced there (``kv_transfer.exchange.pull``)
                transfer.pull_at(rate)
            if self._zero_copy and (pull or not rate):  # every layer in one write, read while on the wire
                endpoint.send_layers_from(
                    transfer,
                    (
                        (index, *block_kv(layer, layout, block_ids))
                        for index, layer in enumerate(self._layers.values())
                    ),
                )
            else:  # layer by layer, at the pre-copy's rate if it has one
                pace = Pacer(rate) if rate else None
                for index, layer in enumerate(self._layers.values()):
                    if self._zero_copy:
                        key, value = block_kv(layer, layout, block_ids)
                        if pace is not None:
                            pace.wait(key.header.raw_nbytes + value.header.raw_nbytes)
                        endpoint.send_layer_from(transfer, index, key, value)
                        continue
                    first, second = block_images(layer, layout, block_ids)
                    if pace is not None:
                        pace.wait(first.nbytes + second.nbytes)
                    endpoint.send_layer(transfer, index, first, second)
                if not self._zero_copy:
                    still_its_own()  # copied out: check now
            landed = endpoint.finish(transfer, before_commit=still_its_own if self._zero_copy else None)
            return replace(landed, block_format=block_format(layout, dtype)).to_dict()
        except TransferFailed as exc:
            return exc.record.to_dict()
        except Exception as exc:
            endpoint.abort(transfer, str(exc))
            return {"transfer_id": transfer_id, "outcome": "failed", "error": f"push failed: {exc}"}


def block_kv(
    layer: torch.Tensor, layout: PagedLayout, block_ids: list[int]
) -> tuple[RegisteredKV, RegisteredKV]:
    """Blocks ``block_ids`` of ``layer`` as the two halves of their raw block images, in place."""
    shape = (len(block_ids) * layout.block_size, layout.num_kv_heads, layout.head_dim)
    first, second = (
        RegisteredKV(KVHeader(KVCodecKind.NONE, kind, shape, layer.dtype), half)
        for kind, half in zip((KVKind.KEY, KVKind.VALUE), block_spans(layer, layout, block_ids), strict=True)
    )
    return first, second


def running_state(requests: dict[str, Any], request_id: str) -> Any:
    """The model runner's state of ``request_id``: vLLM keys requests by the client's id plus ``-`` and eight
    random characters (``InputProcessor``)."""
    if request_id in requests:
        return requests[request_id]
    found = [
        s
        for key, s in list(requests.items())
        if key.startswith(f"{request_id}-") and len(key) == len(request_id) + 9
    ]
    return found[0] if len(found) == 1 else None
