"""The decode worker actor. Shares the engine host and the worker base with the prefill worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

from prefill_worker.worker import EngineWorker
from protocol.ids import RequestId
from protocol.messages import DecodeRequest, SamplingSpec, TokenChunk
from protocol.snapshots import Role


class DecodeWorker(EngineWorker):
    role = Role.DECODE

    async def decode(self, request: DecodeRequest) -> AsyncIterator[TokenChunk]:
        """Ray streaming generator: pull the prompt's KV, stream the tokens after token one. Cancelling the
        generator (``ray.cancel``) aborts the request in vLLM and frees its blocks."""
        async for chunk in self.engine.decode(request):
            yield chunk

    async def release(self, request: DecodeRequest) -> None:
        """Pull and drop the KV of a request that ended on the prefill worker (its first token was a stop
        token), so that the prefill worker frees those blocks now rather than when their lease runs out."""
        one_step = replace(request.sampling, max_tokens=2, ignore_eos=True, stop_token_ids=())
        async for _ in self.engine.decode(replace(request, sampling=one_step)):
            pass

    async def generate(
        self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingSpec
    ) -> AsyncIterator[TokenChunk]:
        """Colocated path (prefill here too), for short prompts and for reference runs."""
        async for chunk in self.engine.generate(RequestId(request_id), prompt_token_ids, sampling):
            yield chunk
