"""The engine contracts: what a worker needs from the engine it hosts. ``ServingEngine`` is every engine's
(prefill, decode, colocated generation, load figures); ``MigratableEngine`` adds what a decode worker's
live migrations need. Implemented by the vLLM engine host (``engine.vllm_engine.VllmEngine``) and the fake
engine (``engine.fake_engine.FakeEngine``); workers are typed against these, never against either."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from protocol.ids import RequestId
from protocol.kv_ops import PushStarted, PushState
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
    # Seconds the engine has had requests in flight without a sign of progress (an output of any of them);
    # 0 while idle. A hung engine core (stopped, deadlocked) grows it without bound.
    stalled_s: float = 0.0


class ServingEngine(Protocol):
    kv_endpoint: str  # where other workers push KV to this engine ("" when its connector has none)

    async def start(self) -> None:
        """Load the model and allocate the KV cache. Blocks (awaits) until the engine can take requests."""

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        """Compute the prompt and one token. When the request goes on to a decode worker, its KV is pushed
        to ``request.kv_destination`` before this returns (or held here for that worker to pull, with
        vLLM's NixlConnector); ``kv_handle`` says where it is. A failed transfer does not fail the prefill:
        ``kv_handle`` is None, ``transfer`` says what failed, and the decode worker recomputes the prompt."""

    def decode(self, request: DecodeRequest) -> AsyncIterator[TokenChunk]:
        """Load the prompt's KV through ``request.kv_handle`` (None: recompute it), then stream the tokens
        after ``first_token_id`` until the request ends. Closing the iterator early aborts the request and
        frees its blocks and its landed KV."""

    def generate(
        self,
        request_id: RequestId,
        prompt_token_ids: tuple[int, ...],
        sampling: SamplingSpec,
        *,
        priority: int = 0,
    ) -> AsyncIterator[TokenChunk]:
        """Colocated path: prefill and decode here, streaming every token. Every request's ``priority``
        (higher first) orders the engine's waiting queue."""

    async def drop_handoff(self, destination: str, request_id: str) -> None:
        """Best effort: have ``destination`` free the KV pushed for ``request_id``, which will never be
        loaded (the request ended before its decode worker produced a token). Never raises."""

    async def abort(self, request_id: RequestId) -> None:
        """Stop a request and free its blocks. Idempotent; unknown ids are ignored."""

    def load(self) -> EngineLoad:
        """The latest load figures. Never blocks."""

    def request_ids(self) -> tuple[str, ...]:
        """The requests in flight here (those ``EngineLoad.in_flight`` counts). Never blocks."""

    async def kv_held(self) -> dict[str, int]:
        """Leak-check figures of the engine's KV exchange (regions, landed and reserved transfers, pulls,
        pushes, loads waiting): all zero when idle."""

    async def kv_settings(self) -> dict[str, Any]:
        """The KV transfer settings the engine's connector runs with (``KVTransferConfig`` as JSON; {} when
        it has no pdflow connector)."""

    @property
    def dead(self) -> bool:
        """True once the engine has failed for good; every request on it fails from then on."""

    async def shutdown(self) -> None:
        """Stop the engine and its subprocesses. Idempotent."""


class MigratableEngine(ServingEngine, Protocol):
    """What a decode worker's live migrations need besides serving."""

    block_size: int  # tokens per KV block, once started

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
        """Start pushing blocks ``[first, end)`` of a running request's KV to another worker's endpoint
        (``destination``) as transfer ``transfer_id``; ``expected`` is the block table earlier stages pushed
        from (a request preempted since holds other blocks, and the push refuses to start). A
        ``background`` push (a pre-copy stage) is paced; a last push goes at once. Returns at once."""

    async def push_status(self, transfer_id: str) -> PushState:
        """How a push ended (its record), or a record of None while it runs. Never blocks for long."""

    async def drop_pushed(self, destination: str, transfer_ids: list[str], why: str) -> None:
        """Best effort: have ``destination`` free pushed transfers that will never be loaded."""

    async def prime(self, request: DecodeRequest, deadline_s: float) -> bool:
        """Destination side, before a hand-over: load the pre-copied parts named by ``request.kv_handle``
        into the prefix cache, keeping them landed. False, with nothing lost, where it could not."""
