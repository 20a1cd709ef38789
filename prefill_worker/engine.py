"""The vLLM engine host: one in-process ``AsyncLLM`` (token ids in, token ids out) behind the
``protocol.engine.ServingEngine`` contract. Role-agnostic: the prefill worker calls ``prefill``, the decode
worker ``decode``; both may call ``generate`` (colocated). vLLM is imported only in ``start`` so that
importing this module stays cheap."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from kv_transfer.params import BLOCK_FORMAT as _BLOCK_FORMAT
from kv_transfer.params import CODEC as _CODEC
from kv_transfer.params import DESTINATION as _DEST
from kv_transfer.params import KEEP as _KEEP
from kv_transfer.params import PARTS as _PARTS
from kv_transfer.params import REMOTE_TOKENS as _REMOTE_TOKENS
from kv_transfer.params import TRANSFER_ID as _TRANSFER
from kv_transfer.params import parts as _parts
from kv_transfer.transport.side_channel import SideChannelClient, SideChannelError
from prefill_worker import engine_wait
from prefill_worker.engine_stats import EngineStats
from protocol.config import EngineConfig, KVConnectorKind
from protocol.engine import EngineLoad
from protocol.errors import WorkerFailed
from protocol.ids import RequestId
from protocol.messages import (
    DecodeRequest,
    FinishReason,
    PrefillRequest,
    PrefillResult,
    SamplingSpec,
    TokenChunk,
)
from protocol.transfers import TransferOutcome

log = logging.getLogger(__name__)

_CONNECTORS = {
    KVConnectorKind.PDFLOW: ("kv_transfer.pdflow_connector", "PdflowConnector"),
    KVConnectorKind.NIXL: ("kv_transfer.vllm_connector", "PdflowNixlConnector"),
}
_RECORD_WAIT_S = 2.0
# vLLM mixes this into its worker so that live migration can reach a running request's blocks
_WORKER_EXTENSION = "decode_worker.migration.worker_ext.MigrationWorkerExtension"
_RPC_DEADLINE_S = 30.0
_SIDE_CALL_DEADLINE_S = 10.0


class VllmEngine:
    """Hosts one vLLM ``AsyncLLM``. Create inside the process that serves it (a Ray actor): vLLM spawns its
    engine core as a subprocess of this one."""

    def __init__(self, model_path: Path, config: EngineConfig, *, engine_id: str) -> None:
        self._model_path = model_path
        self._config = config
        self._engine_id = engine_id
        self._llm: Any = None
        self._stats = EngineStats()
        self._live: set[str] = set()
        # Decode requests whose KV has landed here and waits for vLLM to schedule them: a queue longer than
        # the landed KV's lease must not lose it, so a task renews those leases while any wait.
        self._queued_kv: dict[str, tuple[str, ...]] = {}
        self._renewer: asyncio.Task[None] | None = None
        self.kv_endpoint = ""  # where other workers push KV to this one (pdflow connector)
        # this host's own calls to that side channel (migration pushes): one thread, one client
        self._side_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdflow-side-call")
        self._side_client: SideChannelClient | None = None
        self.block_size = 0  # tokens per KV block, once started

    async def start(self) -> None:
        from vllm.config import KVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        cfg = self._config
        module, connector = _CONNECTORS[cfg.kv_connector]
        extra: dict[str, Any] = {"kv_lease_duration": cfg.kv_lease_seconds}
        if cfg.kv_connector is KVConnectorKind.PDFLOW:
            extra = {
                "side_channel_port": cfg.kv_side_channel_port,
                "lease_s": cfg.kv_lease_seconds,
                "codec": cfg.kv_codec.value,
                "quality_floor": cfg.kv_quality_floor.value,
                "group_size": cfg.kv_group_size,
                "arena_mib": cfg.kv_arena_mib,
                "checksum": cfg.kv_checksum,
                "zero_copy": cfg.kv_zero_copy,
                "transfer_nice": cfg.kv_transfer_nice,
                "keep_freed_mib": cfg.kv_keep_freed_mib,
                "precopy_gbps": cfg.kv_precopy_gbps,
                "precopy_pull": cfg.kv_precopy_pull,
            }
        kv_transfer = KVTransferConfig(
            kv_connector=connector,
            kv_connector_module_path=module,
            kv_role="kv_both",
            kv_buffer_device=cfg.device,
            engine_id=self._engine_id,
            kv_connector_extra_config=extra,
        )
        args = AsyncEngineArgs(
            model=str(self._model_path),
            tokenizer=str(self._model_path),
            dtype=cast(Any, cfg.dtype),
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            num_gpu_blocks_override=cfg.kv_blocks,
            enforce_eager=cfg.enforce_eager,
            # No chunked prefill: vLLM CPU rewinds a seeded request's torch generator after a partial
            # prefill, which the CPU generator cannot do, and the whole engine dies
            # ("CPU Generator does not use offset"). Whole prompts per step avoid partial prefills.
            enable_chunked_prefill=False,
            max_num_batched_tokens=max(cfg.max_model_len, 2048),
            enable_prefix_caching=cfg.prefix_caching,
            kv_transfer_config=kv_transfer,
            worker_extension_cls=_WORKER_EXTENSION if cfg.kv_connector is KVConnectorKind.PDFLOW else "",
            disable_log_stats=False,
            enable_log_requests=False,
        )
        engine_wait.export(cfg.queue_wait_ms, cfg.device)  # for vLLM's processes, started below
        # vLLM builds the engine synchronously (half a minute on CPU): a thread keeps this event loop, and so
        # the caller's start deadline and the actor's other calls, alive meanwhile
        self._llm = await asyncio.to_thread(
            AsyncLLM.from_engine_args, args, stat_loggers=[self._stats.logger_factory]
        )
        total = self._llm.vllm_config.cache_config.num_gpu_blocks or 0
        self.block_size = int(self._llm.vllm_config.cache_config.block_size)
        self._stats.set_total_blocks(int(total))
        if cfg.kv_connector is KVConnectorKind.PDFLOW:
            # the connector binds its side channel itself (any free port unless configured): its address
            self.kv_endpoint = str((await self._rpc("pdflow_attach", ()))[0])
        log.info("engine %s ready: %d KV blocks", self._engine_id, total)

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        started = time.monotonic()
        pdflow = self._config.kv_connector is KVConnectorKind.PDFLOW
        kv_params: dict[str, Any] | None = None
        if request.hand_off and pdflow:
            if not request.kv_destination:
                raise WorkerFailed(
                    f"prefill of {request.request_id}: no decode worker KV endpoint to push to"
                )
            kv_params = {_DEST: request.kv_destination, _TRANSFER: _handoff_id(request.request_id)}
            if request.kv_codec is not None:
                kv_params[_CODEC] = request.kv_codec
        elif request.hand_off:
            kv_params = {"do_remote_decode": True}
        params = self._sampling_params(request.sampling, max_tokens=1, kv_transfer_params=kv_params)
        last = None
        try:
            async for out in self._run(request.request_id, request.prompt_token_ids, params):
                last = out
        finally:
            outputs = last.outputs if last is not None and last.finished else []
            completed = bool(outputs) and outputs[0].finish_reason != "abort"
            if not completed and kv_params is not None and pdflow:  # its pushed KV will never be loaded
                await asyncio.shield(self.drop_handoff(request.kv_destination, request.request_id))
        if last is None or not last.outputs or not last.outputs[0].token_ids:
            raise WorkerFailed(f"prefill of {request.request_id} produced no token")
        first = int(last.outputs[0].token_ids[-1])
        # vLLM says "stop" when token one is EOS or a stop token; otherwise decoding goes on unless the
        # client asked for one token only.
        finish: FinishReason | None = None
        if last.outputs[0].finish_reason == "stop":
            finish = FinishReason.STOP
        elif request.sampling.max_tokens <= 1:
            finish = FinishReason.LENGTH
        transfer = None
        handle = last.kv_transfer_params if request.hand_off else None
        if kv_params is not None and pdflow:
            transfer = await self._stats.wait_record(kv_params[_TRANSFER], _RECORD_WAIT_S)
            if transfer is None:
                raise WorkerFailed(f"prefill of {request.request_id}: the KV transfer left no record")
            if transfer.outcome is not TransferOutcome.SUCCESS:
                raise WorkerFailed(
                    transfer.error or f"KV transfer of {request.request_id} {transfer.outcome}"
                )
            handle = {_TRANSFER: kv_params[_TRANSFER]}
            if transfer.block_format:  # raw block images: the decode side copies them into its blocks as is
                handle[_BLOCK_FORMAT] = transfer.block_format
        return PrefillResult(
            request_id=request.request_id,
            first_token_id=first,
            finish_reason=finish,
            kv_handle=handle,
            prefill_seconds=time.monotonic() - started,
            transfer=transfer,
        )

    async def decode(self, request: DecodeRequest) -> AsyncIterator[TokenChunk]:
        """Continue ``request``: load the KV of ``prompt_token_ids`` through its handle (or, with no handle,
        recompute it), then stream the tokens after ``first_token_id``."""
        if request.kv_handle is None:  # recompute (a migration baseline)
            prompt = (*request.prompt_token_ids, request.first_token_id)
            sampling = replace(request.sampling, max_tokens=request.sampling.max_tokens - 1)
            async for chunk in self.generate(request.request_id, prompt, sampling):
                yield chunk
            return
        kv_params = dict(request.kv_handle)
        # A migration arriving: if its KV fails to load (a part no longer here, or a last part that never
        # lands; the connector tells at once), it is recomputed here rather than failed.
        migrated = _PARTS in kv_params
        if _TRANSFER not in kv_params:  # vLLM's NixlConnector pulls
            kv_params["do_remote_prefill"] = True
            kv_params["do_remote_decode"] = False
        # The prefill worker computed the prompt's KV only; the first token is computed here, then decoding
        # goes on. The connector loads exactly this many tokens.
        kv_params[_REMOTE_TOKENS] = len(request.prompt_token_ids)
        params = self._sampling_params(
            request.sampling, max_tokens=request.sampling.max_tokens - 1, kv_transfer_params=kv_params
        )
        prompt = (*request.prompt_token_ids, request.first_token_id)
        first = _TRANSFER in kv_params
        if first:
            self._hold_queued_kv(request.request_id, tuple(tid for tid, _ in _parts(kv_params)))
        try:
            async for out in self._run(request.request_id, prompt, params):
                chunk = _chunk(request.request_id, out)
                if migrated and first and chunk.finish_reason is FinishReason.ERROR and not chunk.token_ids:
                    # nothing went out yet: recompute it (the connector logged which part was missing)
                    log.warning("%s: migrated KV failed to load; recomputing it", request.request_id)
                    self._queued_kv.pop(request.request_id, None)
                    async for recomputed in self.decode(replace(request, kv_handle=None)):
                        yield recomputed
                    return
                if first:  # scheduled, so its KV is loaded
                    first = False
                    self._queued_kv.pop(request.request_id, None)
                    record = self._stats.record_of(kv_params[_TRANSFER])
                    chunk = replace(chunk, transfer=record) if record is not None else chunk
                yield chunk
        finally:
            self._queued_kv.pop(request.request_id, None)
            if first and not migrated:  # ended (aborted) before its KV was loaded: free the landed copy now
                await asyncio.shield(self._release_landed(kv_params[_TRANSFER]))

    async def prime(self, request: DecodeRequest, deadline_s: float) -> bool:
        """Load a live migration's pre-copied stages (``request.kv_handle``, for ``prompt_token_ids``) into
        this engine's prefix cache ahead of the hand-over, keeping the parts landed: the request that
        continues the migrated one then finds those blocks cached and copies only its last stage in the
        paused step. One step of one token; False, with nothing lost, where it could not run (no prefix
        caching, no pdflow connector, past ``deadline_s``)."""
        if not self._config.prefix_caching or self._config.kv_connector is not KVConnectorKind.PDFLOW:
            return False
        kv_params = dict(request.kv_handle or {}) | {
            _REMOTE_TOKENS: len(request.prompt_token_ids),
            _KEEP: True,
        }
        params = self._sampling_params(request.sampling, max_tokens=1, kv_transfer_params=kv_params)
        prompt = (*request.prompt_token_ids, request.first_token_id)
        finish = None
        try:
            async with asyncio.timeout(deadline_s):
                async for out in self._run(request.request_id, prompt, params):
                    finish = _chunk(request.request_id, out).finish_reason
        except TimeoutError:
            log.info(
                "%s: priming took past %g s; the hand-over loads every stage", request.request_id, deadline_s
            )
            return False
        return finish is not None and finish is not FinishReason.ERROR

    async def generate(
        self, request_id: RequestId, prompt_token_ids: tuple[int, ...], sampling: SamplingSpec
    ) -> AsyncIterator[TokenChunk]:
        params = self._sampling_params(sampling, max_tokens=sampling.max_tokens, kv_transfer_params=None)
        async for out in self._run(request_id, prompt_token_ids, params):
            yield _chunk(request_id, out)

    async def push_blocks(
        self,
        request_id: str,
        transfer_id: str,
        destination: str,
        blocks: tuple[int, int],
        expected: list[int],
        *,
        background: bool,
    ) -> dict[str, Any]:
        """Start pushing blocks ``[first, end)`` of a running request's KV to another worker's KV endpoint
        (live migration); ``push_status`` says how it ended (see ``PdflowConnector.start_push``). Returns
        ``{"block_ids": [...]}`` or ``{"error": ...}``. A ``background`` push (a pre-copy stage) sends at the
        pre-copy's capped rate (``kv_precopy_gbps``), a last push at once.

        Every push is asked for over the connector's side channel, which a thread of the engine's worker
        answers during a step. Pre-copy stages used to be asked for through the engine core, between two
        steps: at 1024 tokens the migrating request's largest gap during the pre-copy was 53-122 ms that way
        and 55-78 ms over the side channel (normal gap 44-72 ms; 10-12 migrations each)."""
        message = {
            "request_id": request_id,
            "transfer_id": transfer_id,
            "destination": destination,
            "first_block": blocks[0],
            "end_block": blocks[1],
            "expected": list(expected),
            "background": background,
        }
        started: dict[str, Any] = await self._side_call({"op": "push", **message})
        return started

    async def push_status(self, transfer_id: str) -> dict[str, Any] | None:
        """How a push ended (its record), or None while it runs. Asked over the connector's side channel,
        which a thread of the engine's worker answers at once, rather than through the engine core's loop
        between two steps (a pre-copy push was polled there every 20 ms for its whole length)."""
        status: dict[str, Any] | None = (
            await self._side_call({"op": "push_status", "transfer_id": transfer_id})
        )["record"]
        return status

    async def _side_call(self, message: dict[str, Any]) -> dict[str, Any]:
        """One request to this engine's own pdflow connector over its side channel (a thread of the engine's
        worker process that answers between and during steps)."""
        if self._llm is None or not self.kv_endpoint:
            raise WorkerFailed("the engine is not started with the pdflow connector")

        def call() -> dict[str, Any]:
            if self._side_client is None:
                self._side_client = SideChannelClient(self.kv_endpoint)
            return self._side_client.call(message, timeout_s=_SIDE_CALL_DEADLINE_S)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._side_thread, call)
        except SideChannelError as exc:
            raise WorkerFailed(f"the engine's KV connector did not answer: {exc}") from exc

    async def drop_pushed(self, destination: str, transfer_ids: list[str], why: str) -> None:
        await self._rpc("pdflow_drop_pushed", (destination, transfer_ids, why))

    async def drop_handoff(self, destination: str, request_id: str) -> None:
        """Best effort: the decode worker frees a hand-off's KV (landed, or its reservation) that will never
        be loaded, rather than at the end of its lease."""
        try:
            await self.drop_pushed(destination, [_handoff_id(request_id)], "the request ended unloaded")
        except Exception as exc:
            log.debug("dropping the hand-off KV of %s: %s", request_id, exc)

    async def _release_landed(self, transfer_id: str) -> None:
        """Best effort: free a landed transfer this engine will not load (idempotent where it was)."""
        try:
            await self._side_call({"op": "abort", "transfer_id": transfer_id, "why": "ended unloaded"})
        except Exception as exc:
            log.debug("releasing landed transfer %s: %s", transfer_id, exc)

    def _hold_queued_kv(self, request_id: str, transfer_ids: tuple[str, ...]) -> None:
        self._queued_kv[request_id] = transfer_ids
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_queued_kv())

    async def _renew_queued_kv(self) -> None:
        """Renew the leases of the landed KV of requests still queued in vLLM at once, then every third of a
        lease; ends when none waits."""
        while self._queued_kv:
            ids = [tid for tids in list(self._queued_kv.values()) for tid in tids]
            try:
                lost = (await self._rpc("pdflow_renew", (ids,)))[0] if ids else []
            except Exception as exc:  # the engine is dying; its requests fail on their own
                log.warning("renewing the leases of queued KV failed: %s", exc)
                lost = []
            if lost:
                log.debug("queued KV no longer held here: %s", lost)
            await asyncio.sleep(self._config.kv_lease_seconds / 3)

    async def kv_held(self) -> dict[str, int]:
        """Leak-check figures of the pdflow connector in the engine (regions, transfers, pushes, loads)."""
        held: dict[str, int] = (await self._rpc("pdflow_kv_held", ()))[0]
        return held

    async def _rpc(self, method: str, args: tuple[Any, ...]) -> list[Any]:
        if self._llm is None:
            raise WorkerFailed("engine is not started")
        if self._config.kv_connector is not KVConnectorKind.PDFLOW:
            raise WorkerFailed("live migration needs the pdflow KV connector")
        result: list[Any] = await asyncio.wait_for(
            self._llm.collective_rpc(method, timeout=_RPC_DEADLINE_S, args=args), _RPC_DEADLINE_S + 1
        )
        return result

    async def abort(self, request_id: RequestId) -> None:
        if self._llm is not None and request_id in self._live:
            await self._llm.abort(request_id)

    def load(self) -> EngineLoad:
        return replace(self._stats.load(), in_flight=len(self._live))

    @property
    def dead(self) -> bool:
        """True once the engine core has died; every request on it fails from then on."""
        return self._llm is not None and bool(self._llm.errored)

    async def shutdown(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if self._llm is not None:
            llm, self._llm = self._llm, None
            llm.shutdown()
        client, self._side_client = self._side_client, None
        if client is not None:
            self._side_thread.submit(client.close)
        self._side_thread.shutdown(wait=False)

    async def _run(self, request_id: str, prompt: tuple[int, ...], params: Any) -> AsyncIterator[Any]:
        """One vLLM request; the request is aborted in vLLM if the caller stops iterating early."""
        if self._llm is None:
            raise WorkerFailed("engine is not started")
        self._live.add(request_id)
        finished = False
        try:
            async for out in self._llm.generate({"prompt_token_ids": list(prompt)}, params, request_id):
                finished = out.finished
                yield out
        finally:
            self._live.discard(request_id)
            if not finished and self._llm is not None:
                await asyncio.shield(self._llm.abort(request_id))

    def _sampling_params(
        self, spec: SamplingSpec, *, max_tokens: int, kv_transfer_params: dict[str, Any] | None
    ) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        extra = {"kv_transfer_params": kv_transfer_params} if kv_transfer_params is not None else None
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k if spec.top_k > 0 else 0,
            seed=spec.seed,
            stop_token_ids=list(spec.stop_token_ids),
            ignore_eos=spec.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            detokenize=False,
            extra_args=extra,
        )


def _chunk(request_id: RequestId, out: Any) -> TokenChunk:
    completion = out.outputs[0] if out.outputs else None
    token_ids = tuple(int(t) for t in completion.token_ids) if completion is not None else ()
    finish: FinishReason | None = None
    if out.finished:
        reason = completion.finish_reason if completion is not None else None
        finish = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}.get(
            str(reason), FinishReason.ERROR
        )
    return TokenChunk(request_id=request_id, token_ids=token_ids, finish_reason=finish)


def _handoff_id(request_id: str) -> str:
    """The transfer id of a request's prefill-to-decode hand-off."""
    return f"{request_id}/handoff"
