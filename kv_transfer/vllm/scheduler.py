"""The scheduler half of ``PdflowConnector``, in vLLM's engine-core process: it decides, per request, what
the worker half saves and loads, and hands that over in each step's metadata (``PdflowConnectorMetadata``).
Every method is called by vLLM's scheduler between steps and never blocks.

Decode side: a request that arrives with ``LoadParams`` has its prompt's tokens reported as external. When
every part of its KV landed before it came (a prefill hand-off always, a migration unless its last part was
still in flight), the worker copies them in at the start of the step that computes the request's next token;
otherwise the request waits for them (``get_finished``) and runs a step later. Prefill side: a request that
arrives with ``SaveParams`` is saved layer by layer during its prefill step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kv_transfer.vllm.meta import LoadSpec, PdflowConnectorMetadata, SaveSpec
from protocol.kv_handle import LoadParams, SaveParams

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request


log = logging.getLogger(__name__)


def _load_params(request_id: str, params: Mapping[str, Any] | None) -> LoadParams | None:
    """The request's load, or None: none asked, or asked in a form this connector cannot read (logged; the
    request then computes its KV itself rather than taking the engine core down)."""
    try:
        return LoadParams.from_params(params)
    except ValueError as exc:
        log.warning("pdflow: %s: %s; its KV is computed here instead", request_id, exc)
        return None


def _all_landed(load: LoadParams) -> bool:
    """Whether every part of a request's KV had landed before the request was sent here."""
    return not load.handle.migrated or not load.handle.in_flight


class PdflowScheduler:
    def __init__(self) -> None:
        self._to_save: dict[str, SaveSpec] = {}
        self._to_load: dict[str, LoadSpec] = {}
        self._drops: list[str] = []
        self._loading: dict[str, list[str]] = {}  # request id -> its transfer ids, until received
        self._local_hits: dict[str, int] = {}

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """The tokens the request's KV transfer brings beyond a local prefix-cache hit, and whether they
        arrive asynchronously (a part still in flight)."""
        load = _load_params(request.request_id, request.kv_transfer_params)
        if load is not None:
            count = load.remote_tokens - num_computed_tokens
            if count > 0:
                self._local_hits[request.request_id] = num_computed_tokens
                return count, not _all_landed(load)
        return 0, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        params = request.kv_transfer_params or {}
        block_ids = list(blocks.get_block_ids()[0]) if blocks is not None else []
        load = _load_params(request.request_id, params) if num_external_tokens > 0 else None
        if load is not None:
            handle = load.handle
            local = self._local_hits.pop(request.request_id, 0)
            landed_before = (
                frozenset(handle.transfer_ids) - handle.in_flight if handle.migrated else frozenset()
            )
            self._to_load[request.request_id] = LoadSpec(
                handle.parts,
                block_ids,
                num_external_tokens,
                local,
                handle.block_format,
                landed_before,
                _all_landed(load),
                load.keep,
            )
            if not load.keep:  # a priming request's parts stay for the request it primes
                self._loading[request.request_id] = list(handle.transfer_ids)
            # Loaded once: if vLLM preempts the request later, it recomputes its KV here, since the
            # transfer is gone by then (asked again, it would wait for it and fail).
            LoadParams.loaded(params)
            return
        save = SaveParams.from_params(params)
        if save is not None and request.request_id not in self._to_save:
            self._to_save[request.request_id] = SaveSpec(
                save.transfer_id, save.destination, block_ids, request.num_prompt_tokens, save.codec
            )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> PdflowConnectorMetadata:
        """This step's saves (of requests scheduled in it), loads and drops, handed to the worker half."""
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
        return False, None
