"""The token streams a decode worker serves, and the relay that lets one of them move.

Every request a decode worker serves runs as a ``LiveStream``: a pump task reads the engine's chunks into a
queue and the worker's generator (``StreamRelay.serve``) relays them to the front door. A migration can
freeze the relay (from then on the client gets nothing from here: the tokens it has are the cut), thaw it
(the tokens held back go out, and the request goes on here), or end it with a ``Handover`` (the request goes
on elsewhere; the generator returns, which aborts the request here and frees its blocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from protocol.ids import RequestId
from protocol.kv_handle import KVHandle
from protocol.messages import DecodeItem, DecodeRequest, Handover, SamplingSpec, TokenChunk

_THAW = object()


class Freeze:
    """Queued to the relay: from this point on, hold tokens back; ``done`` once it took effect."""

    def __init__(self) -> None:
        self.done = asyncio.Event()


async def first_of(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


@dataclass(eq=False)
class LiveStream:
    """One request being served here. ``prompt`` is what the engine was given (prompt tokens, plus every
    token generated before this worker); ``budget`` is how many tokens this worker may still produce."""

    request_id: RequestId
    prompt: tuple[int, ...]
    sampling: SamplingSpec
    budget: int
    delivered: list[int] = field(default_factory=list)
    produced: int = 0  # tokens the engine gave so far (delivered, queued or held back)
    finished: bool = False
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    started: asyncio.Event = field(default_factory=asyncio.Event)  # the client has a token from here
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # the relay returned or failed
    # a migration's last push, still reading this request's blocks after the hand-over: the request (and so
    # its blocks) stays in the engine until it ends
    last_push: asyncio.Future[None] | None = None
    priority: int = 0  # the client's, carried to wherever the request moves
    ticked: asyncio.Event = field(default_factory=asyncio.Event)  # set as each engine chunk is queued
    last_chunk_at: float = 0.0
    gap_s: float = 0.0  # between the engine's last two chunks

    def kv_tokens(self, produced: int) -> int:
        """Tokens whose KV the engine holds once it produced ``produced`` tokens (the last one's KV is
        computed with the next)."""
        return len(self.prompt) + produced - 1

    def continuation(self, kv_handle: KVHandle | None) -> DecodeRequest:
        """The request as another worker continues it after the tokens delivered so far."""
        tokens = (*self.prompt, *self.delivered)
        return DecodeRequest(
            self.request_id,
            tokens[:-1],
            tokens[-1],
            replace(self.sampling, max_tokens=self.budget - len(self.delivered) + 1),
            kv_handle,
            self.priority,
        )

    def freeze(self) -> Freeze:
        """Ask the relay to hold tokens back from now on (await ``done`` for the cut)."""
        freeze = Freeze()
        self.queue.put_nowait(freeze)
        return freeze

    def thaw(self) -> None:
        """Let the tokens held back go out, and serve on here."""
        self.queue.put_nowait(_THAW)

    def hand_over(self, handover: Handover) -> None:
        """End the relay with ``handover``: the request goes on elsewhere."""
        self.queue.put_nowait(handover)


class StreamRelay:
    """The streams a decode worker serves, by request id. ``last_push_wait_s`` bounds how long a relay that
    ended waits for a migration's last push still reading its blocks."""

    def __init__(self, *, last_push_wait_s: float) -> None:
        self._streams: dict[str, LiveStream] = {}
        self._last_push_wait_s = last_push_wait_s

    def get(self, request_id: str) -> LiveStream | None:
        return self._streams.get(request_id)

    def running(self) -> list[str]:
        return [rid for rid, s in self._streams.items() if not s.finished]

    def kv_of_running(self, block_size: int) -> list[tuple[str, int, int]]:
        """(request id, KV blocks it holds here, priority) of every request running here: the engine has
        produced a token for it. A request still queued in the engine holds no blocks yet and cannot move."""
        bs = max(block_size, 1)
        return [
            (rid, -(-s.kv_tokens(s.produced + 1) // bs), s.priority)
            for rid, s in self._streams.items()
            if s.produced and not s.finished
        ]

    async def serve(self, stream: LiveStream, chunks: AsyncIterator[TokenChunk]) -> AsyncIterator[DecodeItem]:
        """Relay ``chunks`` (the engine's stream for ``stream``) unless and until the request moves."""
        if stream.request_id in self._streams:
            raise ValueError(f"request {stream.request_id} is already served here")
        self._streams[stream.request_id] = stream
        pump = asyncio.create_task(_pump(stream, chunks))
        held: list[TokenChunk] | None = None  # a list while frozen
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Handover):
                    yield item
                    return
                if isinstance(item, Freeze):
                    held = []
                    item.done.set()
                    continue
                if item is _THAW:
                    item, held = _merge(stream.request_id, held or []), None
                    if item is None:
                        continue
                elif held is not None:
                    held.append(item)
                    continue
                stream.delivered.extend(item.token_ids)
                if stream.delivered:
                    stream.started.set()
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._streams.pop(stream.request_id, None)
            stream.finished = True
            stream.ended.set()  # wakes a migration waiting on a stream that ended
            stream.started.set()
            if stream.last_push is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait({stream.last_push}, timeout=self._last_push_wait_s)
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump


async def _pump(stream: LiveStream, chunks: AsyncIterator[TokenChunk]) -> None:
    try:
        async for chunk in chunks:
            now = time.monotonic()
            stream.gap_s, stream.last_chunk_at = now - (stream.last_chunk_at or now), now
            stream.produced += len(chunk.token_ids)
            stream.finished = chunk.finish_reason is not None
            stream.queue.put_nowait(chunk)
            stream.ticked.set()
    except Exception as exc:
        stream.finished = True
        stream.queue.put_nowait(exc)
    finally:
        with contextlib.suppress(Exception):
            await chunks.aclose()  # type: ignore[attr-defined]


def _merge(request_id: RequestId, chunks: list[TokenChunk]) -> TokenChunk | None:
    """Chunks held back during a migration that failed, as one."""
    if not chunks:
        return None
    tokens = tuple(t for c in chunks for t in c.token_ids)
    return TokenChunk(request_id, tokens, chunks[-1].finish_reason, chunks[0].transfer)
