"""The vLLM engine host: one in-process ``AsyncLLM`` (token ids in, token ids out) behind the contracts of
``protocol.engine`` (``MigratableEngine``). Role-agnostic: the prefill worker calls ``prefill``, the decode
worker ``decode``; both may call ``generate`` (colocated). How KV leaves a prefill and reaches a decode is the
hand-off strategy's business (``engine.kv_handoff``); calls into the pdflow connector go through
``engine.connector_control``. vLLM is imported only in ``start`` so that importing this module stays cheap."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from engine import vllm_plugin
from engine.connector_control import ConnectorControl
from engine.kv_handoff import kv_handoff
from engine.stats import EngineStats
from engine.worker_ext import MigrationWorkerExtension
from protocol.config import EngineConfig
from protocol.engine import EngineLoad
from protocol.errors import WorkerFailed
from protocol.ids import RequestId
from protocol.kv_config import KVTransferConfig
from protocol.kv_handle import handoff_transfer_id
from protocol.kv_ops import Push, PushStarted, PushState
from protocol.messages import (
    DecodeRequest,
    FinishReason,
    PrefillRequest,
    PrefillResult,
    SamplingSpec,
    TokenChunk,
)

log = logging.getLogger(__name__)
_RPC_DEADLINE_S = 30.0


class VllmEngine:
    """Hosts one vLLM ``AsyncLLM``. Create inside the process that serves it (a Ray actor): vLLM spawns its
    engine core as a subprocess of this one."""

    def __init__(
        self, model_path: Path, config: EngineConfig, kv: KVTransferConfig, *, engine_id: str
    ) -> None:
        self._model_path = model_path
        self._config = config
        self._kv = kv
        self._engine_id = engine_id
        self._llm: Any = None
        self._stats = EngineStats()
        self._handoff = kv_handoff(kv, self._stats)
        # calls into the pdflow connector; None under vLLM's NixlConnector, which has no migration
        self._control = (
            ConnectorControl(self._rpc, lease_s=kv.lease_seconds) if self._handoff.migratable else None
        )
        self._live: set[str] = set()
        self._progress_at = time.monotonic()  # the last output of any request, or the last idle moment
        self.kv_endpoint = ""  # where other workers push KV to this one (pdflow connector)
        self.block_size = 0  # tokens per KV block, once started

    async def start(self) -> None:
        from vllm.config import KVTransferConfig as VllmKVTransferConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        cfg = self._config
        connector = self._handoff.connector()
        kv_transfer = VllmKVTransferConfig(
            kv_connector=connector.name,
            kv_connector_module_path=connector.module,
            kv_role="kv_both",
            kv_buffer_device=cfg.device,
            engine_id=self._engine_id,
            kv_connector_extra_config=connector.extra,
        )
        extension = MigrationWorkerExtension
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
            # the requests' priorities order the waiting queue (ties: first come, first served)
            scheduling_policy="priority",
            kv_transfer_config=kv_transfer,
            # vLLM mixes this into its worker so that live migration can reach the connector
            worker_extension_cls=f"{extension.__module__}.{extension.__qualname__}" if self._control else "",
            disable_log_stats=False,
            enable_log_requests=False,
        )
        vllm_plugin.export(cfg.queue_wait_ms, cfg.device)  # for vLLM's processes, started below
        # vLLM builds the engine synchronously (half a minute on CPU): a thread keeps this event loop, and so
        # the caller's start deadline and the actor's other calls, alive meanwhile
        self._llm = await asyncio.to_thread(
            AsyncLLM.from_engine_args, args, stat_loggers=[self._stats.logger_factory]
        )
        total = self._llm.vllm_config.cache_config.num_gpu_blocks or 0
        self.block_size = int(self._llm.vllm_config.cache_config.block_size)
        self._stats.set_total_blocks(int(total))
        if self._control is not None:
            # the connector binds its side channel itself (any free port unless configured): its address
            self.kv_endpoint = await self._control.attach()
        log.info("engine %s ready: %d KV blocks", self._engine_id, total)

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        started = time.monotonic()
        kv_params = self._handoff.prefill_params(request)
        params = self._sampling_params(request.sampling, max_tokens=1, kv_transfer_params=kv_params)
        last = None
        try:
            async for out in self._run(
                request.request_id, request.prompt_token_ids, params, request.priority
            ):
                last = out
        finally:
            outputs = last.outputs if last is not None and last.finished else []
            completed = bool(outputs) and outputs[0].finish_reason != "abort"
            if not completed and kv_params is not None:  # its pushed KV will never be loaded
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
        handle, transfer = None, None
        if kv_params is not None:
            done = await self._handoff.prefill_done(request, last.kv_transfer_params)
            handle, transfer = done.handle, done.transfer
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
        handle = request.kv_handle
        if handle is None:  # recompute (a migration baseline, or a migrated load that failed)
            prompt = (*request.prompt_token_ids, request.first_token_id)
            sampling = replace(request.sampling, max_tokens=request.sampling.max_tokens - 1)
            async for chunk in self.generate(request.request_id, prompt, sampling, priority=request.priority):
                yield chunk
            return
        # The prefill worker computed the prompt's KV only; the first token is computed here, then decoding
        # goes on. The connector loads exactly the prompt's tokens.
        kv_params = self._handoff.load_params(handle, len(request.prompt_token_ids))
        params = self._sampling_params(
            request.sampling, max_tokens=request.sampling.max_tokens - 1, kv_transfer_params=kv_params
        )
        prompt = (*request.prompt_token_ids, request.first_token_id)
        control = self._control if handle.parts else None  # pdflow: its landed parts wait here until loaded
        first = True
        if control is not None:
            control.hold_queued(request.request_id, handle.transfer_ids)
        try:
            async for out in self._run(request.request_id, prompt, params, request.priority):
                chunk = _chunk(request.request_id, out)
                if (
                    handle.migrated
                    and first
                    and chunk.finish_reason is FinishReason.ERROR
                    and not chunk.token_ids
                ):
                    # A migration's KV failed to load (a part no longer here, or a last part that never
                    # landed; the connector logged which): nothing went out yet, so recompute it here.
                    log.warning("%s: migrated KV failed to load; recomputing it", request.request_id)
                    if control is not None:
                        control.loaded(request.request_id)
                    async for recomputed in self.decode(replace(request, kv_handle=None)):
                        yield recomputed
                    return
                if first:  # scheduled, so its KV is loaded
                    first = False
                    if control is not None:
                        control.loaded(request.request_id)
                        record = self._stats.record_of(handle.parts[-1].transfer_id)
                        chunk = replace(chunk, transfer=record) if record is not None else chunk
                yield chunk
        finally:
            if control is not None:
                control.loaded(request.request_id)
                if first and not handle.migrated:  # ended (aborted) before its load: free the landed copy now
                    await asyncio.shield(control.release_landed(handle.parts[-1].transfer_id))

    async def prime(self, request: DecodeRequest, deadline_s: float) -> bool:
        """Load a live migration's pre-copied stages (``request.kv_handle``, for ``prompt_token_ids``) into
        this engine's prefix cache ahead of the hand-over, keeping the parts landed: the request that
        continues the migrated one then finds those blocks cached and copies only its last stage in the
        paused step. One step of one token; False, with nothing lost, where it could not run (no prefix
        caching, no pdflow connector, past ``deadline_s``)."""
        if not self._config.prefix_caching or self._control is None or request.kv_handle is None:
            return False
        kv_params = self._handoff.load_params(request.kv_handle, len(request.prompt_token_ids), keep=True)
        params = self._sampling_params(request.sampling, max_tokens=1, kv_transfer_params=kv_params)
        prompt = (*request.prompt_token_ids, request.first_token_id)
        finish = None
        try:
            async with asyncio.timeout(deadline_s):
                async for out in self._run(request.request_id, prompt, params, request.priority):
                    finish = _chunk(request.request_id, out).finish_reason
        except TimeoutError:
            log.info(
                "%s: priming took past %g s; the hand-over loads every stage", request.request_id, deadline_s
            )
            return False
        return finish is not None and finish is not FinishReason.ERROR

    async def generate(
        self,
        request_id: RequestId,
        prompt_token_ids: tuple[int, ...],
        sampling: SamplingSpec,
        *,
        priority: int = 0,
    ) -> AsyncIterator[TokenChunk]:
        params = self._sampling_params(sampling, max_tokens=sampling.max_tokens, kv_transfer_params=None)
        async for out in self._run(request_id, prompt_token_ids, params, priority):
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
    ) -> PushStarted:
        """See ``MigratableEngine.push_blocks``: asked of the connector over its side channel, which a thread
        of the engine's worker answers during a step as well (asked between two steps, through the engine
        core, a 1024-token request's largest gap during the pre-copy grew from 55-78 to 53-122 ms)."""
        push = Push(request_id, transfer_id, destination, blocks[0], blocks[1], list(expected), background)
        return await self._migration_control().push(push)

    async def push_status(self, transfer_id: str) -> PushState:
        return await self._migration_control().push_status(transfer_id)

    async def drop_pushed(self, destination: str, transfer_ids: list[str], why: str) -> None:
        await self._migration_control().drop_pushed(destination, transfer_ids, why)

    async def drop_handoff(self, destination: str, request_id: str) -> None:
        """Best effort: the decode worker frees a hand-off's KV (landed, or its reservation) that will never
        be loaded, rather than at the end of its lease."""
        if self._control is None:
            return
        try:
            await self._control.drop_pushed(
                destination, [handoff_transfer_id(request_id)], "the request ended"
            )
        except Exception as exc:
            log.debug("dropping the hand-off KV of %s: %s", request_id, exc)

    async def kv_held(self) -> dict[str, int]:
        """Leak-check figures of the pdflow connector in the engine (regions, transfers, pushes, loads) and
        of the landed KV this host keeps renewing for requests queued in vLLM."""
        if self._control is None:
            return {}
        return await self._control.held() | {"queued_kv": self._control.queued}

    async def kv_settings(self) -> dict[str, Any]:
        """The KV transfer settings the connector in vLLM's worker runs with ({} under another connector)."""
        return await self._control.settings() if self._control is not None else {}

    async def abort(self, request_id: RequestId) -> None:
        if self._llm is not None and request_id in self._live:
            await self._llm.abort(request_id)

    def load(self) -> EngineLoad:
        now = time.monotonic()
        if not self._live:
            self._progress_at = now  # idle: a stall can only start from here
        return replace(self._stats.load(), in_flight=len(self._live), stalled_s=now - self._progress_at)

    def request_ids(self) -> tuple[str, ...]:
        return tuple(self._live)

    @property
    def dead(self) -> bool:
        """True once the engine core has died; every request on it fails from then on."""
        return self._llm is not None and bool(self._llm.errored)

    async def shutdown(self) -> None:
        if self._control is not None:
            self._control.close()
        if self._llm is not None:
            llm, self._llm = self._llm, None
            llm.shutdown()

    def _migration_control(self) -> ConnectorControl:
        if self._control is None:
            raise WorkerFailed("live migration needs the pdflow KV connector (kv.connector: pdflow)")
        return self._control

    async def _rpc(self, method: str, args: tuple[Any, ...]) -> list[Any]:
        if self._llm is None:
            raise WorkerFailed("engine is not started")
        result: list[Any] = await asyncio.wait_for(
            self._llm.collective_rpc(method, timeout=_RPC_DEADLINE_S, args=args), _RPC_DEADLINE_S + 1
        )
        return result

    async def _run(
        self, request_id: str, prompt: tuple[int, ...], params: Any, priority: int = 0
    ) -> AsyncIterator[Any]:
        """One vLLM request; the request is aborted in vLLM if the caller stops iterating early. ``priority``:
        pdflow's (higher is more important); vLLM's scheduler takes lower values first."""
        if self._llm is None:
            raise WorkerFailed("engine is not started")
        self._live.add(request_id)
        finished = False
        try:
            prompt_input = {"prompt_token_ids": list(prompt)}
            async for out in self._llm.generate(prompt_input, params, request_id, priority=-priority):
                self._progress_at = time.monotonic()
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
