"""A fake engine: the engine contracts of ``protocol.engine`` (``MigratableEngine``) with no model, for tests
of everything above the engine (the simulator's engine will share its latency model).

- Tokens: the token after a sequence is a fixed function of the sequence (``next_token``), as greedy decoding
  of a fixed model is; so a request gives the same tokens however prefill, decode and migrations split it,
  and a test can compare them with a colocated run.
- Time: each step takes what a ``LatencyModel`` table says (prefill by prompt length, a decode step by batch
  size), slept on an injected ``sleep``; every running request of the batch gets one token per step.
- KV: blocks of ``block_size`` tokens are counted as a paged engine holds them, and the KV itself moves for
  real through the KV exchange (``kv_transfer.exchange``) over whatever transport the engine is given: each
  layer's keys and values spell the token ids, so the receiving engine checks it loaded the right tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from engine.fake_model import LatencyModel, PriorityTurns, next_token
from engine.stats import rate
from kv_transfer.codec import get_codec
from kv_transfer.exchange.endpoint import KVEndpoint, TransferFailed
from kv_transfer.transport.base import Transport
from protocol.auth import Credentials
from protocol.engine import EngineLoad
from protocol.errors import WorkerFailed
from protocol.ids import RequestId
from protocol.kv_config import KVCodecKind, KVTransferConfig
from protocol.kv_handle import KVHandle, handoff_transfer_id
from protocol.kv_ops import PushStarted, PushState
from protocol.messages import (
    DecodeRequest,
    FinishReason,
    PrefillRequest,
    PrefillResult,
    SamplingSpec,
    TokenChunk,
)
from protocol.snapshots import TransferCounters
from protocol.transfers import TransferOutcome, TransferRecord

log = logging.getLogger(__name__)
LAYERS, HEADS, DIM = 2, 1, 4  # the fake KV's shape per token: small, but every layer and token is checked


def kv_of(tokens: Sequence[int], start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fake KV of ``tokens`` (the first at position ``start``), per layer: keys ``[token, layer,
    position, 1]`` and values the same plus one half, ``[len(tokens), HEADS, DIM]`` each."""
    ids = torch.tensor(list(tokens), dtype=torch.float64)
    positions = torch.arange(start, start + len(tokens), dtype=torch.float64)
    layers = []
    for layer in range(LAYERS):
        key = torch.stack([ids, torch.full_like(ids, layer), positions, torch.ones_like(ids)], dim=1)
        key = key.to(torch.float32).view(len(tokens), HEADS, DIM)
        layers.append((key, key + 0.5))
    return layers


@dataclass(eq=False)
class _Running:
    request_id: str
    sequence: list[int]
    budget: int  # tokens still to produce
    stops: frozenset[int]
    tokens: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    aborted: bool = False


class FakeEngine:
    def __init__(
        self,
        name: str,
        settings: KVTransferConfig | None = None,
        *,
        transport: Transport | None = None,
        latency: LatencyModel | None = None,
        block_size: int = 4,
        kv_blocks: int = 4096,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``transport``: where this engine's KV endpoint sends and receives KV (an ``InProcessTransport``
        on a shared fabric in tests); without one, hand-offs are refused."""
        self.name = name
        self.settings = settings or KVTransferConfig(codec=KVCodecKind.NONE)
        self.latency = latency or LatencyModel()
        self.block_size = block_size
        self.kv_blocks = kv_blocks
        self.kv_endpoint = ""
        self._transport = transport
        self._endpoint: KVEndpoint | None = None
        self._sleep = sleep
        self._clock = clock
        self._running: dict[str, _Running] = {}
        self._prefilling: dict[str, int] = {}  # request -> blocks its prefill holds
        self._prefill_turns = PriorityTurns()  # one prefill at a time, the highest priority first (as vLLM's)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._pushes: dict[str, asyncio.Task[TransferRecord]] = {}
        self._records: dict[str, TransferRecord] = {}
        self._tokens: deque[tuple[float, int]] = deque()
        self._prompt_tokens: deque[tuple[float, int]] = deque()
        self._dead = False
        self._stepping = asyncio.Event()  # cleared by ``hang``: no step, no prefill until ``resume``
        self._stepping.set()
        self._progress_at = clock()

    # ---- lifecycle ----

    async def start(self) -> None:
        if self._transport is not None:
            s = self.settings
            self._endpoint = KVEndpoint(
                self._transport,
                lease_s=s.lease_seconds,
                timeout_s=s.timeout_s,
                checksum=s.checksum,
                secret=Credentials.from_env().cluster_secret,
            )
            self.kv_endpoint = self._endpoint.address
        self._loop_task = asyncio.create_task(self._step_loop())

    def kill(self) -> None:
        """The engine fails for good, as a dead engine core would: every request on it ends in error."""
        self._dead = True
        for running in self._running.values():
            running.aborted = True
        self._wake.set()

    def hang(self) -> None:
        """The engine stops making progress and says nothing, as a stopped or deadlocked engine core does."""
        self._stepping.clear()

    def resume(self) -> None:
        self._stepping.set()

    @property
    def dead(self) -> bool:
        return self._dead

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._endpoint is not None:
            endpoint, self._endpoint = self._endpoint, None
            await asyncio.to_thread(endpoint.close)

    # ---- serving ----

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        started = self._clock()
        prompt = request.prompt_token_ids
        self._check_alive()
        self._prefilling[request.request_id] = self._blocks(len(prompt))
        handle, record = None, None
        try:
            async with self._prefill_turns.turn(request.priority):
                await self._sleep(self.latency.prefill_s(len(prompt)))
                await self._stepping.wait()
            self._check_alive()
            self._progress_at = self._clock()
            self._prompt_tokens.append((self._clock(), len(prompt)))
            first = next_token(prompt)
            if request.hand_off:
                if self._endpoint is None or not request.kv_destination:
                    raise WorkerFailed(f"prefill of {request.request_id}: no KV endpoint to push to")
                transfer_id = handoff_transfer_id(request.request_id)
                record = await asyncio.to_thread(
                    self._send, transfer_id, request.request_id, request.kv_destination, prompt, 0
                )
                if record.outcome is TransferOutcome.SUCCESS:  # else the decode worker recomputes
                    handle = KVHandle.handoff(transfer_id)
        finally:
            self._prefilling.pop(request.request_id, None)
        finish = None
        if first in request.sampling.stop_token_ids:
            finish = FinishReason.STOP
        elif request.sampling.max_tokens <= 1:
            finish = FinishReason.LENGTH
        return PrefillResult(request.request_id, first, finish, handle, self._clock() - started, record)

    async def decode(self, request: DecodeRequest) -> AsyncIterator[TokenChunk]:
        sequence = (*request.prompt_token_ids, request.first_token_id)
        budget = replace(request.sampling, max_tokens=request.sampling.max_tokens - 1)
        handle, record = request.kv_handle, None
        if handle is not None:
            try:
                record = await self._load(handle, request.prompt_token_ids)
            except (ValueError, TimeoutError) as exc:
                if not handle.migrated:
                    log.warning("%s: %s", request.request_id, exc)
                    yield TokenChunk(request.request_id, (), FinishReason.ERROR)
                    return
                log.info("%s: migrated KV failed to load (%s); recomputing it", request.request_id, exc)
        async for chunk in self._run(request.request_id, sequence, budget):
            if record is not None:
                chunk, record = replace(chunk, transfer=record), None
            yield chunk

    async def generate(
        self,
        request_id: RequestId,
        prompt_token_ids: tuple[int, ...],
        sampling: SamplingSpec,
        *,
        priority: int = 0,
    ) -> AsyncIterator[TokenChunk]:
        self._check_alive()
        async with self._prefill_turns.turn(priority):
            await self._sleep(self.latency.prefill_s(len(prompt_token_ids)))
        first = next_token(prompt_token_ids)
        yield TokenChunk(request_id, (first,), FinishReason.LENGTH if sampling.max_tokens <= 1 else None)
        if sampling.max_tokens > 1 and first not in sampling.stop_token_ids:
            rest = replace(sampling, max_tokens=sampling.max_tokens - 1)
            async for chunk in self._run(request_id, (*prompt_token_ids, first), rest):
                yield chunk

    async def prime(self, request: DecodeRequest, deadline_s: float) -> bool:
        return False  # no prefix cache: the hand-over loads every part

    async def abort(self, request_id: RequestId) -> None:
        running = self._running.get(request_id)
        if running is not None:
            running.aborted = True
            self._wake.set()

    # ---- migration (source side) ----

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
        running = self._running.get(request_id)
        if running is None or self._endpoint is None:
            return PushStarted(error=f"request {request_id} is not running on {self.name}")
        first, end = blocks
        start = first * self.block_size
        tokens = list(running.sequence[start : end * self.block_size])
        self._pushes[transfer_id] = asyncio.create_task(
            asyncio.to_thread(self._send, transfer_id, request_id, destination, tokens, start)
        )
        return PushStarted(list(range(end)))

    async def push_status(self, transfer_id: str) -> PushState:
        push = self._pushes.get(transfer_id)
        if push is None:
            return PushState({"transfer_id": transfer_id, "outcome": "failed", "error": "no such push"})
        if not push.done():
            return PushState(None)
        del self._pushes[transfer_id]
        return PushState(push.result().to_dict())

    async def drop_pushed(self, destination: str, transfer_ids: list[str], why: str) -> None:
        if self._endpoint is not None:
            await asyncio.to_thread(self._endpoint.drop_remote, destination, transfer_ids, why)

    async def drop_handoff(self, destination: str, request_id: str) -> None:
        with contextlib.suppress(Exception):
            await self.drop_pushed(destination, [handoff_transfer_id(request_id)], "the request ended")

    # ---- figures ----

    def load(self) -> EngineLoad:
        now = self._clock()
        used = sum(self._blocks(len(r.sequence)) for r in self._running.values()) + sum(
            self._prefilling.values()
        )
        self._collect_records()
        done = [r for r in self._records.values() if r.outcome is TransferOutcome.SUCCESS]
        return EngineLoad(
            num_running=len(self._running),
            num_waiting=0,
            kv_blocks_used=used,
            kv_blocks_total=self.kv_blocks,
            decode_tps=rate(self._tokens, now),
            prompt_tps=rate(self._prompt_tokens, now),
            transfer=TransferCounters(
                transfers=len(done),
                failed=sum(1 for r in self._records.values() if r.outcome is TransferOutcome.FAILED),
                bytes=sum(r.wire_bytes for r in done),
                seconds=sum(r.wire_s + r.decode_s for r in done),
            ),
            in_flight=self._in_flight(now),
            stalled_s=now - self._progress_at,
        )

    def request_ids(self) -> tuple[str, ...]:
        return (*self._prefilling, *self._running)

    def _in_flight(self, now: float) -> int:
        count = len(self._running) + len(self._prefilling)
        if not count:
            self._progress_at = now  # idle: a stall can only start from here
        return count

    async def kv_held(self) -> dict[str, int]:
        figures = dict(self._endpoint.held) if self._endpoint is not None else {}
        return figures | {"pushes": sum(1 for p in self._pushes.values() if not p.done())}

    async def kv_settings(self) -> dict[str, Any]:
        return self.settings.model_dump(mode="json")

    # ---- internals ----

    def _check_alive(self) -> None:
        if self._dead:
            raise WorkerFailed(f"engine {self.name} is dead")

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    async def _run(
        self, request_id: str, sequence: tuple[int, ...], sampling: SamplingSpec
    ) -> AsyncIterator[TokenChunk]:
        """Decode on from ``sequence`` in the batch until ``sampling`` says it ends; abort on early close."""
        self._check_alive()
        if sampling.max_tokens <= 0:
            yield TokenChunk(RequestId(request_id), (), FinishReason.LENGTH)
            return
        running = _Running(
            request_id, list(sequence), sampling.max_tokens, frozenset(sampling.stop_token_ids)
        )
        self._running[request_id] = running
        self._wake.set()
        try:
            while True:
                token = await running.tokens.get()
                if token < 0:
                    reason = FinishReason.ERROR if self._dead else FinishReason.ABORT
                    yield TokenChunk(RequestId(request_id), (), reason)
                    return
                running.budget -= 1
                finish = None
                if token in running.stops:
                    finish = FinishReason.STOP
                elif running.budget <= 0:
                    finish = FinishReason.LENGTH
                yield TokenChunk(RequestId(request_id), (token,), finish)
                if finish is not None:
                    return
        finally:
            self._running.pop(request_id, None)

    async def _step_loop(self) -> None:
        while True:
            if not self._running:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = list(self._running.values())
            await self._sleep(self.latency.step_s(len(batch)))
            await self._stepping.wait()
            now = self._progress_at = self._clock()
            for running in batch:
                if running.aborted:
                    running.tokens.put_nowait(-1)
                    self._running.pop(running.request_id, None)
                    continue
                if running.request_id not in self._running or running.budget - running.tokens.qsize() <= 0:
                    continue
                token = next_token(running.sequence)
                running.sequence.append(token)
                running.tokens.put_nowait(token)
                self._tokens.append((now, 1))

    def _send(
        self, transfer_id: str, request_id: str, destination: str, tokens: Sequence[int], start: int
    ) -> TransferRecord:
        """Push the fake KV of ``tokens`` (from position ``start``) to ``destination``; returns the sender's
        record."""
        assert self._endpoint is not None
        try:
            out = self._endpoint.open(
                transfer_id,
                request_id,
                destination,
                layers=LAYERS,
                raw_bytes=len(tokens) * HEADS * DIM * 4 * 2 * LAYERS,
                tokens=len(tokens),
                codec=get_codec(KVCodecKind.NONE),
                reason="fake engine",
            )
            for index, (key, value) in enumerate(kv_of(tokens, start)):
                self._endpoint.send_layer(out, index, key, value)
            return self._endpoint.finish(out)
        except TransferFailed as exc:
            return exc.record

    async def _load(self, handle: KVHandle, expected: Sequence[int]) -> TransferRecord | None:
        """Load every part of ``handle`` (waiting for parts in flight), checking that the KV spells the
        expected tokens; ValueError if a part is gone or wrong, TimeoutError past the transfer deadline."""
        endpoint = self._endpoint
        if endpoint is None or not handle.parts:
            raise ValueError(f"{self.name} has no KV endpoint to load {handle} from")
        deadline = self._clock() + self.settings.timeout_s
        covered = 0
        for part in handle.parts:
            while (incoming := endpoint.take(part.transfer_id)) is None:
                if (why := endpoint.gone(part.transfer_id)) is not None:
                    raise ValueError(f"transfer {part.transfer_id} will not land: {why}")
                if part.transfer_id not in handle.in_flight or self._clock() > deadline:
                    raise TimeoutError(f"transfer {part.transfer_id} is not here")
                await asyncio.sleep(0.001)
            start = part.first_block * self.block_size
            if start != covered:
                raise ValueError(
                    f"transfer {part.transfer_id} starts at {start}, the KV before it ends at {covered}"
                )
            started = time.perf_counter()
            for _, key, _ in endpoint.decode_layers(incoming):
                want = list(expected[start : start + key.shape[0]])
                if [int(t) for t in key[: len(want), 0, 0].tolist()] != want:
                    endpoint.release(part.transfer_id, error="the KV spells other tokens")
                    raise ValueError(f"transfer {part.transfer_id} carries the KV of other tokens")
            covered = start + incoming.tokens
            endpoint.release(part.transfer_id, decode_s=time.perf_counter() - started)
        if covered < len(expected):
            raise ValueError(f"the parts carry {covered} tokens, the request needs {len(expected)}")
        self._collect_records()
        return self._records.get(handle.parts[-1].transfer_id)

    def _collect_records(self) -> None:
        if self._endpoint is not None:
            for record in self._endpoint.drain_records():
                self._records[record.transfer_id] = record
