"""The load path of ``PdflowConnector``'s worker half (decode side), in vLLM's worker process: copy the landed
parts of each request's KV into its blocks and report the request loaded.

A load whose parts all landed before the request came (``LoadSpec.sync``) runs in the step that computes the
request's next token: the blocks that step writes its new tokens into are copied before the forward pass,
the others layer by layer beside it (``LayeredCopy``: layer ``i``'s attention waits only for layer ``i``'s
copies). Otherwise (a migration whose last part is still in flight) the earlier parts go in as they are
found landed, and vLLM hears of the load (``received``) once every part is in. A part that is gone, or not
there by the deadline, fails the load: its blocks are reported as load errors and vLLM recomputes them.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from kv_transfer.exchange.endpoint import IncomingTransfer, KVEndpoint
from kv_transfer.vllm import paged
from kv_transfer.vllm.layered_copy import LayeredCopy
from kv_transfer.vllm.meta import LoadSpec, PdflowConnectorMetadata
from kv_transfer.vllm.paged import PagedLayout, block_format, scatter

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Load:
    """A load in progress: parts copied in so far (index in ``spec.parts`` -> tokens)."""

    spec: LoadSpec
    deadline: float
    loaded: dict[int, int] = field(default_factory=dict)


class _LoadFailed(Exception):
    pass


class KVLoader:
    def __init__(
        self, endpoint: KVEndpoint, layers: dict[str, torch.Tensor], layout: PagedLayout, *, timeout_s: float
    ) -> None:
        self._endpoint = endpoint
        self._layers = layers
        self._index = {name: i for i, name in enumerate(layers)}
        self._layout = layout
        self._timeout_s = timeout_s
        self._pending: dict[str, _Load] = {}
        self._received: set[str] = set()
        self._load_errors: set[int] = set()
        # this step's copies of landed KV that run beside the forward pass, and the loads whose parts they
        # read: request id -> (load, its parts to release once the copies ran)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdflow-load")
        self._copy: LayeredCopy | None = None
        self._copying: dict[str, tuple[_Load, list[str]]] = {}

    @property
    def pending(self) -> int:
        """Loads waiting for their KV (leak check)."""
        return len(self._pending)

    def start(self, meta: PdflowConnectorMetadata) -> None:
        """Start of a step: free the parts of requests that ended unloaded, take this step's loads, and copy
        whatever landed (the blocks of synchronous loads beside the forward pass)."""
        for transfer_id in meta.drops:
            self._endpoint.release(transfer_id)
        for rid, spec in meta.loads.items():
            self._pending[rid] = _Load(spec, time.monotonic() + self._timeout_s)
        copy = LayeredCopy(len(self._layers))
        self._progress(copy)
        if copy:
            copy.start(self._pool)
            self._copy = copy

    def wait_for_layer(self, layer_name: str) -> None:
        """Layer ``layer_name``'s attention starts once this step's copies into that layer ran."""
        copy, index = self._copy, self._index.get(layer_name)
        if copy is None or index is None:
            return
        if not copy.wait(index, self._timeout_s):
            log.warning("pdflow: KV copies into layer %s took past %g s", layer_name, self._timeout_s)
            for rid in self._copying:
                copy.errors.setdefault(rid, TimeoutError(f"copy into layer {layer_name} timed out"))

    def finished(self) -> set[str]:
        """End of a step: finish its copies, copy in what landed since, and return the asynchronous loads
        that completed (vLLM schedules those requests next)."""
        self.finish_copy()
        self._progress()
        received, self._received = self._received, set()
        return received

    def load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def finish_copy(self) -> None:
        """Wait for this step's layered copies, then release the parts they read (failed: blocks fail)."""
        copy, self._copy = self._copy, None
        if copy is None:
            return
        if not copy.join(self._timeout_s):
            log.warning("pdflow: KV copies still running after %g s; their loads fail", self._timeout_s)
            for rid in self._copying:
                copy.errors.setdefault(rid, TimeoutError("the KV copies took too long"))
        copying, self._copying = self._copying, {}
        for rid, (load, tids) in copying.items():
            error = copy.errors.get(rid)
            if error is not None:
                log.warning("pdflow: loading KV of %s failed: %s", rid, error)
                self._fail_blocks(load)
            for tid in tids:
                if error is not None:
                    self._release(load, tid, error=f"the KV of {rid} failed to load: {error}")
                else:
                    self._release(load, tid, decode_s=copy.seconds.get(rid, 0.0) / len(tids))

    def shutdown(self) -> None:
        self.finish_copy()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _progress(self, copy: LayeredCopy | None = None) -> None:
        """Copy every landed part of a pending load into its request's blocks (a migration's earlier stages
        go in while its last one is still on the wire); report a load once all its parts are in, and fail it
        when a part is gone or past the deadline. With ``copy`` (at the start of a step), a synchronous
        load of block images queues there what the step's forward pass can wait for layer by layer."""
        if not self._pending:
            return
        now = time.monotonic()
        for rid, load in list(self._pending.items()):
            layered = copy if copy is not None and load.spec.sync and load.spec.block_format else None
            deferred: list[str] = []  # parts read by queued copies: released once those ran
            try:
                for position, part in enumerate(load.spec.parts):
                    tid = part.transfer_id
                    if position in load.loaded:
                        continue
                    if (why := self._endpoint.gone(tid)) is not None:
                        raise _LoadFailed(f"transfer {tid} will not land: {why}")
                    incoming = self._endpoint.take(tid)
                    if incoming is None and (load.spec.sync or tid in load.spec.landed_before):
                        raise _LoadFailed(f"transfer {tid} is no longer here (its lease ran out, or dropped)")
                    if incoming is None:
                        continue
                    started = time.perf_counter()
                    later = self._load_part(load.spec, part.first_block, incoming, layered, rid)
                    load.loaded[position] = incoming.tokens
                    if later:
                        deferred.append(tid)
                        continue
                    self._release(load, tid, decode_s=time.perf_counter() - started)
                if len(load.loaded) < len(load.spec.parts):
                    if now > load.deadline:
                        missing = [
                            p.transfer_id for i, p in enumerate(load.spec.parts) if i not in load.loaded
                        ]
                        raise _LoadFailed(f"transfers {missing} never landed before the load deadline")
                    continue
                self._check_coverage(load)
            except Exception as exc:
                log.warning("pdflow: loading KV of %s failed: %s", rid, exc)
                self._fail_blocks(load)
                if layered is not None and deferred:  # its queued copies are skipped; released after
                    layered.errors.setdefault(rid, exc)
                for i, part in enumerate(load.spec.parts):
                    if i not in load.loaded:
                        self._release(load, part.transfer_id, error=f"the KV of {rid} failed to load: {exc}")
            del self._pending[rid]
            if deferred:
                self._copying[rid] = (load, deferred)
            if not load.spec.sync:  # vLLM waits to hear of an asynchronous load only
                self._received.add(rid)

    def _release(self, load: _Load, transfer_id: str, **outcome: Any) -> None:
        if not load.spec.keep:
            self._endpoint.release(transfer_id, **outcome)

    def _fail_blocks(self, load: _Load) -> None:
        """Report the blocks ``load`` was to write as failed. A local prefix-cache hit's are left out: they
        are shared with other requests, which vLLM would fail too (it checks every running request for a
        synchronous load)."""
        self._load_errors.update(load.spec.block_ids[load.spec.local_tokens // self._layout.block_size :])

    def _load_part(
        self, spec: LoadSpec, first: int, incoming: IncomingTransfer, copy: LayeredCopy | None, owner: str
    ) -> bool:
        """Copy one landed part into the request's blocks from block ``first`` on, leaving the blocks of a
        local prefix-cache hit alone. With ``copy``, the blocks this step's new tokens cannot land in are
        queued there instead (under ``owner``); True if any were."""
        layout = self._layout
        bs = layout.block_size
        if first * bs + incoming.tokens > len(spec.block_ids) * bs:
            raise ValueError(
                f"transfer {incoming.transfer_id} runs past the request's {len(spec.block_ids)} blocks"
            )
        put: Callable[[torch.Tensor, PagedLayout, list[int], torch.Tensor, torch.Tensor], None] = scatter
        if spec.block_format:
            mine = block_format(layout, next(iter(self._layers.values())).dtype)
            if spec.block_format != mine:
                raise ValueError(f"block images of layout {spec.block_format}, this engine stores {mine}")
            put = paged.put_block_images
        rows = 1 if spec.block_format else bs  # of a part, per block (block halves: one; tokens: bs)
        skip = max(0, spec.local_tokens // bs - first)  # blocks of this part that a prefix-cache hit holds
        if skip * bs >= incoming.tokens:
            return False
        names = list(self._layers)
        blocks = spec.block_ids[first + skip :]
        # the step writes its new tokens from block (local + loaded tokens) // bs on, before any layer's
        # attention: those blocks go in now, the ones before may go in beside the forward pass
        later = max(0, (spec.local_tokens + spec.tokens) // bs - first - skip) if copy is not None else 0
        for index, key, value in self._endpoint.decode_layers(incoming):
            if spec.block_format:
                key, value = paged.block_halves(layout, key, value)
            layer, key, value = self._layers[names[index]], key[skip * rows :], value[skip * rows :]
            if later * rows < key.shape[0]:
                put(layer, layout, blocks[later:], key[later * rows :], value[later * rows :])
            if later and copy is not None:
                copy.add(
                    index,
                    owner,
                    functools.partial(
                        put, layer, layout, blocks[:later], key[: later * rows], value[: later * rows]
                    ),
                )
        return bool(later)

    def _check_coverage(self, load: _Load) -> None:
        """The loaded parts must cover every token the request expects, contiguously from block 0."""
        bs, covered = self._layout.block_size, 0
        for position, part in enumerate(load.spec.parts):
            if part.first_block * bs != covered:
                raise ValueError(
                    f"transfer {part.transfer_id} starts at block {part.first_block}, "
                    f"the KV before it ends at token {covered}"
                )
            covered += load.loaded[position]
        if covered < (need := load.spec.local_tokens + load.spec.tokens):
            raise ValueError(f"transfers carry {covered} tokens, the request needs {need}")
