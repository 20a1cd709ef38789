"""``PdflowConnector``: pdflow's vLLM KV connector. Compressed, layer-pipelined push over NIXL.

vLLM builds one in its engine-core process (the scheduler role) and one in each worker process (the worker
role); the two halves talk only through ``PdflowConnectorMetadata`` (scheduler → worker, each step) and the
finished-receiving set (worker → scheduler). This class is the facade vLLM calls:

- scheduler half: ``PdflowScheduler`` (``scheduler.py``), which decides what each step saves and loads;
- worker half, built in ``register_kv_caches`` once the KV cache exists: the worker's ``KVEndpoint`` over
  NIXL, the save path ``KVSaver`` (``saver.py``, prefill side), the load path ``KVLoader`` (``loader.py``,
  decode side), and the source side of live migrations, ``BlockPusher`` (``block_push.py``), which the
  engine host reaches over the endpoint's side channel (``Push``, ``PushStatus``) and through vLLM's
  ``collective_rpc`` (``engine.worker_ext``).

Settings come as ``KVTransferConfig`` (vLLM's ``kv_connector_extra_config``), validated once here. Records of
every transfer leave through the connector stats.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kv_transfer.exchange.allocator import keep_freed_memory
from kv_transfer.exchange.endpoint import KVEndpoint
from kv_transfer.transport.base import TransportError
from kv_transfer.transport.nixl import NixlTransport
from kv_transfer.vllm.block_push import BlockPusher
from kv_transfer.vllm.codec_chooser import CodecChooser
from kv_transfer.vllm.loader import KVLoader
from kv_transfer.vllm.meta import PdflowConnectorMetadata, PdflowTransferStats
from kv_transfer.vllm.paged import PagedLayout, probe_block_order
from kv_transfer.vllm.saver import KVSaver
from kv_transfer.vllm.scheduler import PdflowScheduler
from protocol.auth import Credentials
from protocol.kv_config import KVTransferConfig
from protocol.kv_ops import Push, PushStatus

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


class PdflowConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.settings = KVTransferConfig.from_connector(self._kv_transfer_config.kv_connector_extra_config)
        self._engine_id = str(self._kv_transfer_config.engine_id)
        self._scheduler = PdflowScheduler()
        self._pusher = BlockPusher()  # bound to the endpoint and the cache in register_kv_caches
        # worker half, once the KV cache is registered
        self._endpoint: KVEndpoint | None = None
        self._saver: KVSaver | None = None
        self._loader: KVLoader | None = None
        self._chooser: CodecChooser | None = None

    # ---- scheduler half (engine core) -------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.request_finished(request, block_ids)

    # ---- worker half ------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Build the worker half around the KV cache: its layout (probing vLLM CPU's in-block order), the
        NIXL transport with the cache registered (zero-copy sends), the endpoint, the codec chooser, and the
        save, load and push paths."""
        settings, layers = self.settings, dict(kv_caches)
        first = next(iter(layers.values()))
        heads = self._vllm_config.model_config.get_num_kv_heads(self._vllm_config.parallel_config)
        layout = PagedLayout.infer(first, heads)
        if layout.cpu_fused:
            kv_dtype = str(self._vllm_config.cache_config.cache_dtype)
            layout = layout.with_block_order(*probe_block_order(layout, first.dtype, kv_dtype))
        keep_freed_memory(settings.keep_freed_mib)  # decoded layers reuse freed pages
        transport = NixlTransport(
            f"pdflow-{self._engine_id}",
            settings.arena_mib << 20,
            device=str(first.device),
            nice=settings.transfer_nice,
        )
        try:
            zero_copy = settings.zero_copy and _register(transport, layers)
            endpoint = KVEndpoint(
                transport,
                host=settings.side_channel_host,
                port=settings.side_channel_port,
                lease_s=settings.lease_seconds,
                timeout_s=settings.timeout_s,
                checksum=settings.checksum,
                secret=Credentials.from_env().cluster_secret,
            )
        except BaseException:
            transport.close()  # now, not in a garbage collection during the engine's shutdown
            raise
        self._endpoint = endpoint
        self._chooser = CodecChooser.for_layout(layout, first.dtype, layers=len(layers), settings=settings)
        self._chooser.bind_probe(endpoint.probe)
        self._saver = KVSaver(endpoint, layers, layout, self._chooser, zero_copy=zero_copy)
        self._loader = KVLoader(endpoint, layers, layout, timeout_s=settings.timeout_s)
        self._pusher.bind(
            endpoint,
            layers,
            layout,
            zero_copy=zero_copy,
            rate=settings.precopy_rate(first.device.type),
            pull=settings.precopy_pull,
        )
        endpoint.add_op(Push, self._pusher.start)
        endpoint.add_op(PushStatus, self._pusher.status)
        log.info(
            "pdflow connector %s: %d layers %s, side channel %s",
            self._engine_id,
            len(layers),
            tuple(first.shape),
            endpoint.address,
        )

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._meta()
        if meta is not None and self._loader is not None:
            self._loader.start(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._loader is not None:
            self._loader.wait_for_layer(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        meta = self._meta()
        if meta is not None and meta.saves and self._saver is not None:
            self._saver.save_layer(meta, layer_name, kv_layer)

    def wait_for_save(self) -> None:
        if self._loader is not None:
            self._loader.finish_copy()
        if self._saver is not None:
            self._saver.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._endpoint is None or self._loader is None:
            return None, None
        self._endpoint.expire()  # transfers nobody loaded (a client gone after a hand-over) end here
        return None, self._loader.finished() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._loader.load_errors() if self._loader is not None else set()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        records: list[dict[str, Any]] = []
        if self._saver is not None:
            records, self._saver.records = self._saver.records, []
        if self._endpoint is not None:
            records += [r.to_dict() for r in self._endpoint.drain_records()]
        return PdflowTransferStats(data={"pdflow_records": records}) if records else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return PdflowTransferStats(data=dict(data) if data is not None else {})

    def shutdown(self) -> None:
        if self._loader is not None:
            self._loader.shutdown()
        self._pusher.shutdown()
        if self._chooser is not None:
            self._chooser.close()
        if self._endpoint is not None:
            self._endpoint.close()
            self._endpoint = None

    def _meta(self) -> PdflowConnectorMetadata | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, PdflowConnectorMetadata) else None

    # ---- reached by the engine host (``engine.worker_ext``, collective_rpc between steps) ---------------

    def attach(self, requests: dict[str, Any]) -> None:
        """Give the pusher the model runner's request states, so that a push can find a running request's
        blocks without waiting for a step."""
        self._pusher.attach(requests)

    @property
    def address(self) -> str:
        """``host:port`` of the side channel where other workers push KV to this one ("" before start)."""
        return self._endpoint.address if self._endpoint is not None else ""

    def held(self) -> dict[str, int]:
        """Leak-check figures of this worker half: staging regions, landed and reserved transfers, pulls,
        pushes running, loads waiting for their KV."""
        figures = dict(self._endpoint.held) if self._endpoint is not None else {}
        figures["pushes"] = self._pusher.running()
        figures["pending_loads"] = self._loader.pending if self._loader is not None else 0
        return figures

    def renew(self, transfer_ids: list[str]) -> list[str]:
        """Keep the landed KV of requests still queued in this engine (see ``Receiver.renew``)."""
        return self._endpoint.renew(transfer_ids) if self._endpoint is not None else list(transfer_ids)

    def drop_pushed(self, destination: str, transfer_ids: list[str], why: str) -> None:
        """Best effort: have ``destination`` free pushed transfers that will never be loaded (their leases
        free them anyway if this is lost)."""
        if self._endpoint is not None:
            self._endpoint.drop_remote(destination, transfer_ids, why)


def _register(transport: NixlTransport, layers: dict[str, torch.Tensor]) -> bool:
    """Register every KV layer with NIXL, so that pushes and raw hand-offs read blocks straight from the
    cache (no gather, no staging copy). False, and they copy instead, where that is not possible."""
    try:
        for layer in layers.values():
            transport.register(layer)
    except TransportError as exc:
        log.warning("pdflow: KV cache not registered with NIXL, pushes will copy it: %s", exc)
        return False
    return True
