"""The engine Protocol: what a worker needs from the engine it hosts. Implemented by the vLLM engine host
(``prefill_worker.engine``) and by the simulated engine (``simulator``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from protocol.ids import RequestId
from protocol.messages import DecodeRequest, PrefillRequest, PrefillResult, SamplingSpec, TokenChunk
from protocol.snapshots import TransferCounters


@dataclass(frozen=True, slots=True)
class EngineLoad:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    decode_tps: float
    prompt_tps: float
    transfer: TransferCounters
    # Requests admitted by the worker and not yet returned. vLLM's running/waiting figures come with engine
    # steps, so a prefill that is one long step never shows in them; this count moves at once.
    in_flight: int = 0


class ServingEngine(Protocol):
    async def start(self) -> None:
        """Load the model and allocate the KV cache. Blocks (awaits) until the engine can take requests."""

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        """Compute the prompt and one token. When the request goes on to a decode worker, the KV stays held
        here until that worker has pulled it (or a lease runs out); ``kv_handle`` says where it is."""

    def decode(self, request: DecodeRequest) -> AsyncIterator[TokenChunk]:
        """Pull the prompt's KV, then stream the tokens after ``first_token_id`` until the request ends.
        Closing the iterator early aborts the request and frees its blocks."""

    def generate(
        self, request_id: RequestId, prompt_token_ids: tuple[int, ...], sampling: SamplingSpec
    ) -> AsyncIterator[TokenChunk]:
        """Colocated path: prefill and decode here, streaming every token."""

    async def abort(self, request_id: RequestId) -> None:
        """Stop a request and free its blocks. Idempotent; unknown ids are ignored."""

    def load(self) -> EngineLoad:
        """The latest load figures. Never blocks."""

    async def shutdown(self) -> None:
        """Stop the engine and its subprocesses. Idempotent."""
