"""A migration source over a scripted engine: the engine's pushes succeed or fail as a test says, and its
token stream yields the tokens the test feeds it, when it feeds them."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from decode_worker.migration.source import MigrationSource, Primer
from decode_worker.migration.stream import LiveStream, StreamRelay
from protocol.config import MigrationConfig, MigrationMode
from protocol.ids import RequestId
from protocol.kv_ops import PushStarted, PushState
from protocol.messages import (
    DecodeItem,
    DecodeRequest,
    FinishReason,
    Handover,
    MigrationTarget,
    SamplingSpec,
    TokenChunk,
)
from protocol.migrations import MigrationOutcome

BS = 4
RID = RequestId("req-1")
DEST = MigrationTarget("decode-1", "pdflow-decode-1", "tcp://decode-1:5555")
LIVE, STOP_AND_COPY, RECOMPUTE = MigrationMode.LIVE, MigrationMode.STOP_AND_COPY, MigrationMode.RECOMPUTE
MOVED, FAILED, FINISHED = MigrationOutcome.MOVED, MigrationOutcome.FAILED, MigrationOutcome.FINISHED


@dataclass
class Push:
    transfer_id: str
    blocks: tuple[int, int]
    expected: list[int]
    background: bool


class ScriptedEngine:
    """The migration calls of a ``MigratableEngine``, recorded. ``fail[k]`` fails the k-th push: with an
    ``error`` only, the push does not start; with ``outcome`` too, its record says it failed.
    ``on_push(k, background)`` runs at the start of each push, before it returns: the engine keeps stepping
    meanwhile. A push is "running" the first time its status is asked, then ended."""

    def __init__(self, fail: dict[int, dict[str, Any]] | None = None) -> None:
        self.block_size = BS
        self.pushes: list[Push] = []
        self.dropped: list[tuple[str, list[str], str]] = []
        self.fail = fail or {}
        self.on_push: Callable[[int, bool], Awaitable[None]] | None = None
        self._records: dict[str, dict[str, Any]] = {}
        self._polled: set[str] = set()

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
        k = len(self.pushes)
        self.pushes.append(Push(transfer_id, blocks, list(expected), background))
        if self.on_push is not None:
            await self.on_push(k, background)
        injected = self.fail.get(k)
        if injected is not None and "outcome" not in injected:
            return PushStarted(error=str(injected["error"]))
        self._records[transfer_id] = injected or {
            "outcome": "success",
            "wire_bytes": 100 * (blocks[1] - blocks[0]),
            "block_format": "fake/4",
        }
        if not background:
            self._polled.add(transfer_id)  # the last push: ended by the time it is asked about
        return PushStarted(list(range(blocks[1])))

    async def push_status(self, transfer_id: str) -> PushState:
        if transfer_id not in self._polled:  # in flight the first time it is asked
            self._polled.add(transfer_id)
            return PushState(None)
        return PushState(self._records[transfer_id])

    async def drop_pushed(self, destination: str, transfer_ids: list[str], why: str) -> None:
        self.dropped.append((destination, list(transfer_ids), why))


class Tokens:
    """The engine's token stream for one request: the test decides when each token is produced."""

    def __init__(self, first: int = 1000) -> None:
        self.queue: asyncio.Queue[tuple[int, FinishReason | None]] = asyncio.Queue()
        self.made: list[int] = []
        self.closed = False
        self._next = first

    def feed(self, n: int, finish: FinishReason | None = None) -> list[int]:
        new = list(range(self._next, self._next + n))
        self._next += n
        self.made += new
        for i, tok in enumerate(new):
            self.queue.put_nowait((tok, finish if i == n - 1 else None))
        return new

    async def chunks(self) -> AsyncIterator[TokenChunk]:
        try:
            while True:
                tok, finish = await self.queue.get()
                yield TokenChunk(RID, (tok,), finish)
                if finish is not None:
                    return
        finally:
            self.closed = True  # the request ended or was aborted in the engine


async def until(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait for ``cond`` (checked every millisecond), at most ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.001)


async def settle() -> None:
    """Let every task that can run without waiting run (no wall time passes)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def collect(relay: AsyncIterator[DecodeItem]) -> list[DecodeItem]:
    return [item async for item in relay]


@dataclass
class Served:
    source: MigrationSource
    streams: StreamRelay
    stream: LiveStream
    tokens: Tokens
    relay: asyncio.Task[list[DecodeItem]]


def serve(
    engine: ScriptedEngine,
    prompt_len: int = 10,
    budget: int = 100,
    *,
    priority: int = 0,
    primer: Primer | None = None,
    **config: Any,
) -> Served:
    """A source relaying one stream (``prompt_len`` prompt tokens, ``budget`` to produce) to a client that
    collects every item."""
    cfg = MigrationConfig(**config)
    streams = StreamRelay(last_push_wait_s=cfg.timeout_s)
    source = MigrationSource(engine, streams, "decode-0", cfg, primer=primer)
    stream = LiveStream(
        RID, tuple(range(prompt_len)), SamplingSpec(max_tokens=budget + 1), budget, priority=priority
    )
    tokens = Tokens()
    return Served(
        source, streams, stream, tokens, asyncio.create_task(collect(streams.serve(stream, tokens.chunks())))
    )


def start(
    engine: ScriptedEngine, prompt_len: int = 10, budget: int = 100, **config: Any
) -> tuple[MigrationSource, LiveStream, Tokens, asyncio.Task[list[DecodeItem]]]:
    s = serve(engine, prompt_len, budget, **config)
    return s.source, s.stream, s.tokens, s.relay


async def produce(
    stream: LiveStream, tokens: Tokens, n: int, finish: FinishReason | None = None
) -> list[int]:
    """Have the engine produce ``n`` tokens and wait until the relay's pump read them."""
    target = stream.produced + n
    new = tokens.feed(n, finish)
    await until(lambda: stream.produced >= target)
    return new


def relayed(items: list[DecodeItem]) -> list[int]:
    return [t for c in items if isinstance(c, TokenChunk) for t in c.token_ids]


def handed_over(items: list[DecodeItem]) -> bool:
    return any(isinstance(i, Handover) for i in items)


def continuation(items: list[DecodeItem]) -> DecodeRequest:
    """The hand-over the relay ended with."""
    last = items[-1]
    assert isinstance(last, Handover), last
    return last.continuation


def final_end(stream: LiveStream, delivered: int) -> int:
    return math.ceil((len(stream.prompt) + delivered - 1) / BS)
