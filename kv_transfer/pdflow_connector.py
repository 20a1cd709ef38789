"""``PdflowConnector``: pdflow's vLLM KV connector. Compressed, layer-pipelined push over NIXL.

Prefill side: as soon as vLLM has computed a layer of a request that hands off (``save_kv_layer``), the
request's K and V for that layer are encoded with the codec the policy chose for the link and written into
the decode worker's staging arena while later layers run; ``wait_for_save`` waits for the tail and commits, so
the prefill step returns with the KV already landed. Decode side: the request arrives with
``pdflow_transfer_id``; the scheduler half reports the prompt's tokens as external and loaded asynchronously,
the worker half decodes the landed layers into the request's blocks and reports them received, and vLLM
computes only what follows.

The two halves talk only through ``PdflowConnectorMetadata`` (scheduler → worker, each step) and the
finished-receiving set (worker → scheduler). Records of every transfer leave through the connector stats.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kv_transfer import paged
from kv_transfer.allocator import keep_freed_memory
from kv_transfer.block_push import BlockPusher, block_kv
from kv_transfer.codec import get_codec
from kv_transfer.codec_choice import CodecChooser
from kv_transfer.connector_meta import LoadSpec, PdflowConnectorMetadata, PdflowTransferStats, SaveSpec
from kv_transfer.endpoint import IncomingTransfer, KVEndpoint, TransferFailed
from kv_transfer.layered_copy import LayeredCopy
from kv_transfer.outgoing import OutgoingTransfer
from kv_transfer.pacing import precopy_rate
from kv_transfer.paged import PagedLayout, block_format, gather, probe_block_order, scatter
from kv_transfer.params import BLOCK_FORMAT, CODEC, IN_FLIGHT, KEEP, PARTS, REMOTE_TOKENS
from kv_transfer.params import DESTINATION as DEST
from kv_transfer.params import TRANSFER_ID as TRANSFER
from kv_transfer.params import parts as transfer_parts
from kv_transfer.transport.base import TransportError
from kv_transfer.transport.nixl import NixlTransport

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Load:
    """A load in progress on the worker half: parts copied in so far (index in ``spec.parts`` -> tokens)."""

    spec: LoadSpec
    deadline: float
    loaded: dict[int, int] = field(default_factory=dict)


class _LoadFailed(Exception):
    pass


def _all_landed(params: dict[str, Any]) -> bool:
    """Whether every part of a request's KV had landed before the request was sent here: a prefill's
    hand-off always (the prefill worker answers only once the decode side committed it), a migration's
    unless a part was still in flight at the hand-over."""
    return PARTS not in params or not params.get(IN_FLIGHT)


class PdflowConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self._extra = extra
        self._engine_id = str(self._kv_transfer_config.engine_id)
        # scheduler half
        self._to_save: dict[str, SaveSpec] = {}
        self._to_load: dict[str, LoadSpec] = {}
        self._drops: list[str] = []
        self._loading: dict[str, list[str]] = {}  # request id -> its transfer ids, until received
        self._local_hits: dict[str, int] = {}
        # worker half
        self._endpoint: KVEndpoint | None = None
        self._layers: dict[str, torch.Tensor] = {}
        self._zero_copy = False  # the layers are registered with the transport: pushes send from them
        self._layer_index: dict[str, int] = {}
        self._layout: PagedLayout | None = None
        self._chooser: CodecChooser | None = None
        self._sending: dict[str, OutgoingTransfer] = {}
        self._failed_saves: set[str] = set()
        self._pending_loads: dict[str, _Load] = {}
        self._received: set[str] = set()
        self._load_errors: set[int] = set()
        self._records: list[dict[str, Any]] = []
        self._timeout_s = float(extra.get("timeout_s", 30.0))
        self._pusher = BlockPusher()  # the source side of live migrations
        # this step's copies of landed KV that run beside the forward pass (see ``layered_copy``), and the
        # loads whose parts they read: request id -> (load, its parts to release once the copies ran)
        self._copy_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdflow-load")
        self._copy: LayeredCopy | None = None
        self._copying: dict[str, tuple[_Load, list[str]]] = {}

    # ---- scheduler half ---------------------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Decode side: the prompt's tokens come from the transfer. When every part of it has landed already,
        the worker copies them in at the start of the step that computes the request's next token; otherwise
        the request waits for them (``get_finished``) and runs a step later. Never blocks."""
        params = request.kv_transfer_params or {}
        if TRANSFER in params and REMOTE_TOKENS in params and not params.get(DEST):
            count = int(params[REMOTE_TOKENS]) - num_computed_tokens
            if count > 0:
                self._local_hits[request.request_id] = num_computed_tokens
                return count, not _all_landed(params)
        return 0, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        params = request.kv_transfer_params or {}
        block_ids = list(blocks.get_block_ids()[0]) if blocks is not None else []
        if num_external_tokens > 0 and TRANSFER in params:
            local = self._local_hits.pop(request.request_id, 0)
            parts = transfer_parts(params)
            in_flight = set(params.get(IN_FLIGHT, ()))
            self._to_load[request.request_id] = LoadSpec(
                parts,
                block_ids,
                num_external_tokens,
                local,
                str(params.get(BLOCK_FORMAT, "")),
                frozenset(tid for tid, _ in parts if tid not in in_flight)
                if PARTS in params
                else frozenset(),
                _all_landed(params),
                bool(params.get(KEEP)),
            )
            if not params.get(KEEP):  # a priming request's parts stay for the request it primes
                self._loading[request.request_id] = [tid for tid, _ in parts]
            # Loaded once: if vLLM preempts the request later, it recomputes its KV here, since the
            # transfer is gone by then (asked again, it would wait for it and fail).
            params.pop(REMOTE_TOKENS, None)
        elif params.get(DEST) and TRANSFER in params and request.request_id not in self._to_save:
            self._to_save[request.request_id] = SaveSpec(
                str(params[TRANSFER]),
                str(params[DEST]),
                block_ids,
                request.num_prompt_tokens,
                params.get(CODEC),
            )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        scheduled = set(scheduler_output.num_scheduled_tokens)
        saves = {rid: spec for rid, spec in self._to_save.items() if rid in scheduled}
        meta = PdflowConnectorMetadata(saves=saves, loads=self._to_load, drops=self._drops)
        self._to_save = {rid: spec for rid, spec in self._to_save.items() if rid not in scheduled}
        self._to_load, self._drops = {}, []
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        for rid in connector_output.finished_recving or ():
            self._loading.pop(rid, None)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """The prefill side's transfer finished inside the step (``wait_for_save``): blocks free now. A decode
        request that ends before its load tells the worker to drop the landed copy."""
        self._to_save.pop(request.request_id, None)
        self._local_hits.pop(request.request_id, None)
        self._drops.extend(self._loading.pop(request.request_id, ()))
        params = request.kv_transfer_params or {}
        if params.get(DEST):
            return False, {TRANSFER: params.get(TRANSFER)}
        return False, None

    # ---- worker half ------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._layers = dict(kv_caches)
        self._layer_index = {name: i for i, name in enumerate(kv_caches)}
        first = next(iter(kv_caches.values()))
        heads = self._vllm_config.model_config.get_num_kv_heads(self._vllm_config.parallel_config)
        self._layout = PagedLayout.infer(first, heads)
        if self._layout.cpu_fused:
            kv_dtype = str(self._vllm_config.cache_config.cache_dtype)
            self._layout = self._layout.with_block_order(
                *probe_block_order(self._layout, first.dtype, kv_dtype)
            )
        capacity = int(self._extra.get("arena_mib", 256)) << 20
        keep_freed_memory(int(self._extra.get("keep_freed_mib", 256)))  # decoded layers reuse freed pages
        transport = NixlTransport(
            f"pdflow-{self._engine_id}",
            capacity,
            device=str(first.device),
            nice=int(self._extra.get("transfer_nice", 0)),
        )
        try:
            self._zero_copy = bool(self._extra.get("zero_copy", True)) and self._register_layers(transport)
            self._endpoint = KVEndpoint(
                transport,
                port=int(self._extra.get("side_channel_port", 0)),
                lease_s=float(self._extra.get("lease_s", 12.0)),
                timeout_s=self._timeout_s,
                checksum=bool(self._extra.get("checksum", True)),
            )
        except BaseException:
            transport.close()  # now, not in a garbage collection during the engine's shutdown (see close)
            raise
        self._chooser = CodecChooser.for_layout(
            self._layout,
            first.dtype,
            layers=len(kv_caches),
            codec=str(self._extra.get("codec", "auto")),
            floor=str(self._extra.get("quality_floor", "lossless")),
            group_size=int(self._extra.get("group_size", 64)),
        )
        self._chooser.bind_probe(self._endpoint.probe)
        self._pusher.bind(
            self._endpoint,
            self._layers,
            self._layout,
            zero_copy=self._zero_copy,
            rate=precopy_rate(self._extra.get("precopy_gbps"), first.device.type),
            pull=bool(self._extra.get("precopy_pull", True)),
        )
        self._endpoint.add_op("push", self.start_push)
        self._endpoint.add_op("push_status", lambda m: {"record": self.push_status(str(m["transfer_id"]))})
        log.info(
            "pdflow connector %s: %d layers %s, side channel %s",
            self._engine_id,
            len(kv_caches),
            tuple(first.shape),
            self._endpoint.address,
        )

    def _register_layers(self, transport: NixlTransport) -> bool:
        """Register every KV layer with NIXL, so that migration pushes read blocks straight from the cache
        (no gather, no staging copy). False, and pushes copy as before, where that is not possible."""
        try:
            for layer in self._layers.values():
                transport.register(layer)
        except TransportError as exc:
            log.warning("pdflow: KV cache not registered with NIXL, pushes will copy it: %s", exc)
            return False
        return True

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._meta()
        if meta is None or self._endpoint is None:
            return
        for transfer_id in meta.drops:
            self._endpoint.release(transfer_id)
        for rid, spec in meta.loads.items():
            self._pending_loads[rid] = _Load(spec, time.monotonic() + self._timeout_s)
        copy = LayeredCopy(len(self._layers))
        self._progress_loads(copy)
        if copy:
            copy.start(self._copy_pool)
            self._copy = copy

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Layer ``layer_name``'s attention starts once this step's copies into that layer ran."""
        copy, index = self._copy, self._layer_index.get(layer_name)
        if copy is None or index is None:
            return
        if not copy.wait(index, self._timeout_s):
            log.warning("pdflow: KV copies into layer %s took past %g s", layer_name, self._timeout_s)
            for rid in self._copying:
                copy.errors.setdefault(rid, TimeoutError(f"copy into layer {layer_name} timed out"))

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        meta = self._meta()
        if meta is None or not meta.saves or self._endpoint is None or self._layout is None:
            return
        index = self._layer_index[layer_name]
        for rid, spec in meta.saves.items():
            if rid in self._failed_saves:
                continue
            try:
                transfer = self._sending.get(rid)
                if transfer is None:
                    transfer = self._open(rid, spec)
                    self._sending[rid] = transfer
                blocks = spec.block_ids[: -(-spec.tokens // self._layout.block_size)]
                if self._sends_blocks(transfer):
                    self._send_blocks(transfer, index, self._layers[layer_name], blocks)
                else:
                    key, value = gather(kv_layer, self._layout, blocks)
                    self._endpoint.send_layer(transfer, index, key, value, hold=True)  # copies
            except TransferFailed as exc:
                self._fail_save(rid, exc.record.to_dict())
            except Exception as exc:  # never let a transfer problem kill the engine step
                log.warning("pdflow: sending layer %s of %s failed: %s", layer_name, rid, exc)
                self._failed_saves.add(rid)
                if (t := self._sending.pop(rid, None)) is not None:
                    self._endpoint.abort(t, str(exc))

    def wait_for_save(self) -> None:
        self._finish_copy()
        if self._endpoint is None:
            return
        done_computing = time.monotonic()
        for rid, transfer in self._sending.items():
            try:
                record = self._endpoint.finish(transfer, compute_done_at=done_computing)
                if self._chooser is not None:
                    self._chooser.observe(
                        transfer.peer,
                        record.wire_bytes,
                        record.wire_s,
                        codec=record.codec,
                        raw_bytes=record.raw_bytes,
                        encode_s=record.encode_s,
                    )
                if self._sends_blocks(transfer):
                    record = replace(record, block_format=self._block_format())
                self._records.append(record.to_dict())
            except TransferFailed as exc:
                log.warning("pdflow: transfer of %s failed: %s", rid, exc)
                self._records.append(exc.record.to_dict())
        self._sending.clear()
        self._failed_saves.clear()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._endpoint is not None:
            self._endpoint.expire()  # transfers nobody loaded (a client gone after a hand-over) end here
        self._finish_copy()
        self._progress_loads()
        received, self._received = self._received, set()
        return None, received or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        records = list(self._records)
        self._records.clear()
        if self._endpoint is not None:
            records += [r.to_dict() for r in self._endpoint.drain_records()]
        return PdflowTransferStats(data={"pdflow_records": records}) if records else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return PdflowTransferStats(data=dict(data) if data is not None else {})

    def shutdown(self) -> None:
        self._finish_copy()
        self._copy_pool.shutdown(wait=True, cancel_futures=True)
        self._pusher.shutdown()
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None

    # ---- helpers ----------------------------------------------------------------------------------------

    def _meta(self) -> PdflowConnectorMetadata | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, PdflowConnectorMetadata) else None

    def _open(self, rid: str, spec: SaveSpec) -> OutgoingTransfer:
        assert self._endpoint is not None and self._layout is not None and self._chooser is not None
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
        return self._zero_copy and transfer.codec.name == "none"

    def _send_blocks(
        self, transfer: OutgoingTransfer, index: int, layer: torch.Tensor, block_ids: list[int]
    ) -> None:
        """Queue layer ``index``'s blocks ``block_ids`` as raw block images read from ``layer`` in place
        (registered with the transport): the blocks must stay unchanged until the transfer finishes."""
        assert self._endpoint is not None and self._layout is not None
        self._endpoint.send_layer_from(transfer, index, *block_kv(layer, self._layout, block_ids))

    def _block_format(self) -> str:
        assert self._layout is not None
        return block_format(self._layout, next(iter(self._layers.values())).dtype)

    def _fail_save(self, rid: str, record: dict[str, Any]) -> None:
        self._failed_saves.add(rid)
        self._sending.pop(rid, None)
        self._records.append(record)

    def _progress_loads(self, copy: LayeredCopy | None = None) -> None:
        """Copy every landed part of a pending load into its request's blocks (a migration's earlier stages
        go in while its last one is still on the wire); report a load once all its parts are in, and fail it
        when a part is gone or past the deadline. With ``copy`` (at the start of a step), a synchronous
        load of block images queues there what the step's forward pass can wait for layer by layer."""
        if self._endpoint is None or self._layout is None or not self._pending_loads:
            return
        now = time.monotonic()
        for rid, load in list(self._pending_loads.items()):
            layered = copy if copy is not None and load.spec.sync and load.spec.block_format else None
            deferred: list[str] = []  # parts read by queued copies: released once those ran
            try:
                for position, (tid, first) in enumerate(load.spec.parts):
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
                    later = self._load_part(load.spec, first, incoming, layered, rid)
                    load.loaded[position] = incoming.tokens
                    if later:
                        deferred.append(tid)
                        continue
                    self._release(load, tid, decode_s=time.perf_counter() - started)
                if len(load.loaded) < len(load.spec.parts):
                    if now > load.deadline:
                        missing = [tid for i, (tid, _) in enumerate(load.spec.parts) if i not in load.loaded]
                        raise _LoadFailed(f"transfers {missing} never landed before the load deadline")
                    continue
                self._check_coverage(load)
            except Exception as exc:
                log.warning("pdflow: loading KV of %s failed: %s", rid, exc)
                self._fail_blocks(load)
                if layered is not None and deferred:  # its queued copies are skipped; released after
                    layered.errors.setdefault(rid, exc)
                for i, (tid, _) in enumerate(load.spec.parts):
                    if i not in load.loaded:
                        self._release(load, tid, error=f"the KV of {rid} failed to load: {exc}")
            del self._pending_loads[rid]
            if deferred:
                self._copying[rid] = (load, deferred)
            if not load.spec.sync:  # vLLM waits to hear of an asynchronous load only
                self._received.add(rid)

    def _release(self, load: _Load, transfer_id: str, **outcome: Any) -> None:
        if self._endpoint is not None and not load.spec.keep:
            self._endpoint.release(transfer_id, **outcome)

    def _fail_blocks(self, load: _Load) -> None:
        """Report the blocks ``load`` was to write as failed. A local prefix-cache hit's are left out: they
        are shared with other requests, which vLLM would fail too (it checks every running request for a
        synchronous load)."""
        assert self._layout is not None
        self._load_errors.update(load.spec.block_ids[load.spec.local_tokens // self._layout.block_size :])

    def _finish_copy(self) -> None:
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

    def _load_part(
        self,
        spec: LoadSpec,
        first: int,
        incoming: IncomingTransfer,
        copy: LayeredCopy | None = None,
        owner: str = "",
    ) -> bool:
        """Copy one landed part into the request's blocks from block ``first`` on, leaving the blocks of a
        local prefix-cache hit alone. With ``copy``, the blocks this step's new tokens cannot land in are
        queued there instead (under ``owner``); True if any were."""
        assert self._endpoint is not None and self._layout is not None
        bs = self._layout.block_size
        if first * bs + incoming.tokens > len(spec.block_ids) * bs:
            raise ValueError(
                f"transfer {incoming.transfer_id} runs past the request's {len(spec.block_ids)} blocks"
            )
        put: Callable[[torch.Tensor, PagedLayout, list[int], torch.Tensor, torch.Tensor], None] = scatter
        if spec.block_format:
            mine = block_format(self._layout, next(iter(self._layers.values())).dtype)
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
                key, value = paged.block_halves(self._layout, key, value)
            layer, key, value = self._layers[names[index]], key[skip * rows :], value[skip * rows :]
            if later * rows < key.shape[0]:
                put(layer, self._layout, blocks[later:], key[later * rows :], value[later * rows :])
            if later and copy is not None:
                copy.add(
                    index,
                    owner,
                    functools.partial(
                        put, layer, self._layout, blocks[:later], key[: later * rows], value[: later * rows]
                    ),
                )
        return bool(later)

    def _check_coverage(self, load: _Load) -> None:
        """The loaded parts must cover every token the request expects, contiguously from block 0."""
        assert self._layout is not None
        bs, covered = self._layout.block_size, 0
        for position, (tid, first) in enumerate(load.spec.parts):
            if first * bs != covered:
                raise ValueError(
                    f"transfer {tid} starts at block {first}, the KV before it ends at token {covered}"
                )
            covered += load.loaded[position]
        if covered < (need := load.spec.local_tokens + load.spec.tokens):
            raise ValueError(f"transfers carry {covered} tokens, the request needs {need}")

    # ---- live migration (source side) -------------------------------------------------------------------

    def attach(self, requests: dict[str, Any]) -> None:
        """Give the worker half the model runner's request states (``pdflow_attach`` of the worker
        extension), so that a push can find a running request's blocks without waiting for a step."""
        self._pusher.attach(requests)

    def start_push(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Start a migration push (``BlockPusher.start``), on the side channel's thread (op ``push``, from
        this worker's own host)."""
        return self._pusher.start(msg)

    def push_status(self, transfer_id: str) -> dict[str, Any] | None:
        """The record of a push once it ended (then forgotten), None while it runs."""
        return self._pusher.status(transfer_id)

    @property
    def address(self) -> str:
        """``host:port`` of the side channel where other workers push KV to this one ("" before start)."""
        return self._endpoint.address if self._endpoint is not None else ""

    def held(self) -> dict[str, int]:
        """Leak-check figures of this worker half: staging regions, landed and reserved transfers, pushes
        running, loads waiting for their KV."""
        figures = dict(self._endpoint.held) if self._endpoint is not None else {}
        figures["pushes"] = self._pusher.running()
        figures["pending_loads"] = len(self._pending_loads)
        return figures

    def renew(self, transfer_ids: list[str]) -> list[str]:
        """Keep the landed KV of requests still queued in this engine (see ``KVEndpoint.renew``)."""
        return self._endpoint.renew(transfer_ids) if self._endpoint is not None else list(transfer_ids)

    def drop_pushed(self, destination: str, transfer_ids: list[str], why: str) -> None:
        """Best effort: have ``destination`` free pushed transfers that will never be loaded (their leases
        free them anyway if this is lost)."""
        if self._endpoint is not None:
            self._endpoint.drop_remote(destination, transfer_ids, why)
