"""The source side of a live migration, and the token streams it can move.

Every request a decode worker serves runs as a ``LiveStream``: a pump task reads the engine's chunks into a
queue and the worker's generator relays them. A migration (``MigrationSource.migrate``) pushes the KV in
stages while the stream flows: stage k pushes the blocks that filled since stage k-1 (whole blocks only,
which a running request never rewrites). When few blocks are left, or after the stage limit, the stream
freezes: from then on the client gets nothing from here, and the cut is every token it already has. The last
blocks (the partial one included) are pushed while the engine goes on (tokens past the cut never reach the
client), and the generator yields a ``Handover`` once that push has landed (the destination then loads every
part in the step that computes the next token), then returns, which aborts the request here and frees its
blocks. With ``overlap_last_push`` (and an earlier stage) the ``Handover`` goes out as the last push starts
instead, and the generator returns once it has ended: the destination copies the earlier stages in meanwhile,
and recomputes the request if the last push never lands. If anything fails before the hand-over, the stream
thaws (the tokens held back go out) and the request goes on here: it runs on exactly one worker either way.

Once the pre-copy stages landed, the destination primes its prefix cache with them (``VllmEngine.prime``, a
one-token request that loads the stages and keeps them landed) while the request goes on here: the paused
step there then copies only the last stage, whatever the sequence's length.

Pushes are keyed by ``{request}/{migration}/{stage}``: each lands in its own reservation on the destination,
which frees it when it is loaded, dropped, or its lease ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from kv_transfer.params import BLOCK_FORMAT, IN_FLIGHT, PARTS, TRANSFER_ID
from protocol.config import MigrationConfig, MigrationMode
from protocol.ids import RequestId
from protocol.messages import DecodeRequest, SamplingSpec, TokenChunk
from protocol.migrations import Handover, MigrationOutcome, MigrationReport, MigrationTarget

log = logging.getLogger(__name__)
_POLL_S = 0.002  # how often the last push is polled: it is on the hand-over's critical path
_BACKGROUND_POLL_S = 0.02  # a pre-copy stage: off the critical path
# how long the freeze waits for the engine's next token: twice the last gap between two, within these bounds
_FREEZE_WAIT_MIN_S, _FREEZE_WAIT_MAX_S = 0.02, 0.5


class MigrationEngine(Protocol):
    """What a migration needs of the engine host (``prefill_worker.engine.VllmEngine``)."""

    block_size: int

    async def push_blocks(
        self,
        request_id: str,
        transfer_id: str,
        destination: str,
        blocks: tuple[int, int],
        expected: list[int],
        *,
        background: bool,
    ) -> dict[str, Any]: ...

    async def push_status(self, transfer_id: str) -> dict[str, Any] | None: ...

    async def drop_pushed(self, destination: str, transfer_ids: list[str], why: str) -> None: ...


# asks the destination to load the pre-copied stages into its prefix cache (``DecodeWorker.prime``)
Primer = Callable[[MigrationTarget, DecodeRequest], Awaitable[bool]]


class MigrationFailed(Exception):
    pass


_THAW = object()


class _Freeze:
    """Queued to the relay: from this point on, hold tokens back; ``done`` once it took effect."""

    def __init__(self) -> None:
        self.done = asyncio.Event()


async def _first(*events: asyncio.Event) -> None:
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

    def continuation(self, kv_handle: dict[str, Any] | None) -> DecodeRequest:
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


class MigrationSource:
    def __init__(
        self, engine: MigrationEngine, instance_id: str, config: MigrationConfig, primer: Primer | None = None
    ) -> None:
        self._engine = engine
        self._primer = primer
        self._instance_id = instance_id
        self._config = config
        self._streams: dict[str, LiveStream] = {}
        self._moves: dict[str, tuple[str, asyncio.Future[None]]] = {}  # request -> (migration id, its move)
        self._background: set[asyncio.Future[None]] = set()

    def running(self) -> list[str]:
        return [rid for rid, s in self._streams.items() if not s.finished]

    def cancel(self, request_id: str) -> bool:
        """Abort the migration of ``request_id`` wherever it is; before the hand-over the request goes on
        here (the stream thaws, the parts pushed so far are dropped). False if none is in flight."""
        _, move = self._moves.get(request_id, ("", None))
        if move is None or move.done():
            return False
        move.cancel()
        return True

    def kv_of_running(self) -> list[tuple[str, int, int]]:
        """(request id, KV blocks it holds here, priority) of every request running here: the engine has
        produced a token for it. A request still queued in the engine holds no blocks yet and cannot move."""
        bs = max(self._engine.block_size, 1)
        return [
            (rid, -(-s.kv_tokens(s.produced + 1) // bs), s.priority)
            for rid, s in self._streams.items()
            if s.produced and not s.finished
        ]

    def migrating(self) -> dict[str, str]:
        return {rid: migration_id for rid, (migration_id, _) in self._moves.items()}

    async def serve(self, stream: LiveStream, chunks: AsyncIterator[TokenChunk]) -> AsyncIterator[TokenChunk]:
        """Relay ``chunks`` (the engine's stream for ``stream``) unless and until the request moves."""
        if stream.request_id in self._streams:
            raise ValueError(f"request {stream.request_id} is already served here")
        self._streams[stream.request_id] = stream
        pump = asyncio.create_task(self._pump(stream, chunks))
        held: list[TokenChunk] | None = None  # a list while frozen
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Handover):
                    yield TokenChunk(stream.request_id, (), handover=item)
                    return
                if isinstance(item, _Freeze):
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
                    await asyncio.wait({stream.last_push}, timeout=self._config.timeout_s)
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def migrate(
        self, request_id: str, migration_id: str, target: MigrationTarget, mode: MigrationMode
    ) -> MigrationReport:
        """Move ``request_id`` to ``target``; returns once it moved, or failed and stays here."""
        started = time.monotonic()
        report = MigrationReport(
            request_id, migration_id, self._instance_id, target.instance_id, mode, MigrationOutcome.FAILED
        )
        stream = self._streams.get(request_id)
        if stream is None or stream.finished:
            return replace(report, error=f"request {request_id} is not running on {self._instance_id}")
        if request_id in self._moves:
            return replace(
                report, error=f"request {request_id} is already migrating ({self._moves[request_id][0]})"
            )
        if target.instance_id == self._instance_id:
            return replace(report, error="the destination is the source")
        plan = _Plan(stream, migration_id, target)
        move = asyncio.ensure_future(self._move(plan, mode))
        self._moves[request_id] = (migration_id, move)
        try:
            await asyncio.wait({move}, timeout=self._config.timeout_s)
            if not move.done():
                move.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await move
                raise TimeoutError(f"migration did not finish within {self._config.timeout_s:g} s")
            if move.cancelled():
                raise MigrationFailed("migration cancelled")
            move.result()
        except Exception as exc:
            error = str(exc) or type(exc).__name__
            if plan.handed_at is not None:  # the destination has it; only the last push failed or hangs
                log.warning("migration %s of %s: moved, but %s", migration_id, request_id, error)
                return replace(report, outcome=MigrationOutcome.MOVED, error=error, **plan.figures(started))
            if plan.frozen_at is not None:
                stream.queue.put_nowait(_THAW)
            if plan.parts:
                with contextlib.suppress(Exception):
                    await self._engine.drop_pushed(target.kv_endpoint, plan.part_ids(), error)
            outcome = MigrationOutcome.FINISHED if stream.finished else MigrationOutcome.FAILED
            log.info(
                "migration %s of %s to %s: %s (%s)",
                migration_id,
                request_id,
                target.instance_id,
                outcome.value,
                error,
            )
            return replace(report, outcome=outcome, error=error, **plan.figures(started))
        finally:
            self._moves.pop(request_id, None)
            if not move.done() and plan.handed_at is None:  # the caller went away: stop, thaw, drop
                move.cancel()
                if plan.frozen_at is not None:
                    stream.queue.put_nowait(_THAW)
                if plan.parts:
                    drop = self._engine.drop_pushed(
                        target.kv_endpoint, plan.part_ids(), "migration abandoned"
                    )
                    self._background.add(task := asyncio.ensure_future(drop))
                    task.add_done_callback(self._background.discard)
        log.info("migration %s of %s to %s: moved", migration_id, request_id, target.instance_id)
        return replace(report, outcome=MigrationOutcome.MOVED, **plan.figures(started))

    async def _move(self, plan: _Plan, mode: MigrationMode) -> None:
        stream, bs = plan.stream, self._engine.block_size
        # A request still waiting for its KV or its first step here has nothing to move yet: wait for its
        # first token (the migration's deadline bounds the wait).
        await stream.started.wait()
        if mode is MigrationMode.LIVE:
            while len(plan.parts) < self._config.max_stages:
                kv_tokens = stream.kv_tokens(stream.produced)
                left = -(-kv_tokens // bs) - plan.pushed
                full = kv_tokens // bs
                if left <= self._config.final_blocks or full <= plan.pushed or stream.finished:
                    break
                await self._push(plan, plan.add_part(), full, background=True)
            if plan.parts and self._primer is not None and self._config.prime_destination:
                await self._prime(plan)
        await _just_after_a_token(stream)
        plan.frozen_at = time.monotonic()
        freeze = _Freeze()
        stream.queue.put_nowait(freeze)
        # Once the relay takes the freeze, ``delivered`` is the cut: all the client gets from this worker.
        await _first(freeze.done, stream.ended)
        if stream.finished:
            raise MigrationFailed(f"request {stream.request_id} finished before it could move")
        if not stream.delivered:
            raise MigrationFailed(f"request {stream.request_id} has no token yet; nothing to migrate")
        handle: dict[str, Any] | None = None
        last: asyncio.Future[None] | None = None
        if mode is not MigrationMode.RECOMPUTE:
            end = -(-stream.kv_tokens(len(stream.delivered)) // bs)
            if (
                end > plan.pushed
                and mode is MigrationMode.LIVE
                and plan.parts
                and self._config.overlap_last_push
            ):
                # Hand over as the last push starts: the destination copies the earlier stages into its
                # blocks while the last one travels (it waits for it, and recomputes if it never lands).
                # The relay waits for this push before it ends, and so before the abort that frees the
                # request's blocks here.
                last = asyncio.ensure_future(self._push(plan, plan.add_part(), end, background=False))
                stream.last_push = last
            elif end > plan.pushed:
                await self._push(plan, plan.add_part(), end, background=False)
            if stream.ended.is_set():  # the client left or the engine failed during the last push
                if last is not None:  # let it end before its part is dropped
                    await asyncio.wait({last}, timeout=self._config.timeout_s)
                raise MigrationFailed(f"request {stream.request_id} ended during the final copy")
            handle = {
                TRANSFER_ID: plan.parts[-1][0],
                PARTS: [list(p) for p in plan.parts],
                BLOCK_FORMAT: plan.block_format,
            }
            if last is not None:
                handle[IN_FLIGHT] = [plan.parts[-1][0]]
        plan.tokens = stream.kv_tokens(len(stream.delivered))
        plan.handed_at = time.monotonic()
        stream.queue.put_nowait(Handover(plan.migration_id, plan.target, stream.continuation(handle)))
        if last is not None:
            try:
                await asyncio.shield(last)  # a cancelled migration still lets it end (the relay waits on it)
            except Exception as exc:  # have the destination give up waiting for it, and recompute
                with contextlib.suppress(Exception):
                    await self._engine.drop_pushed(plan.target.kv_endpoint, [plan.parts[-1][0]], str(exc))
                raise MigrationFailed(f"the last stage failed after the hand-over: {exc}") from exc

    async def _push(self, plan: _Plan, transfer_id: str, end: int, *, background: bool) -> None:
        """Push blocks ``[plan.pushed, end)`` as part ``transfer_id`` (``plan.add_part``); raise
        ``MigrationFailed`` if it fails."""
        stream = plan.stream
        result = await self._engine.push_blocks(
            stream.request_id,
            transfer_id,
            plan.target.kv_endpoint,
            (plan.pushed, end),
            plan.block_ids,
            background=background,
        )
        if "error" in result:
            raise MigrationFailed(str(result["error"]))
        plan.block_ids = list(result["block_ids"])
        record = result.get("record")
        if record is None:  # a paced stage ends no sooner (polled from its start: ~20 round trips a stage)
            await asyncio.sleep(float(result.get("eta_s", 0.0)))
        while record is None:
            await asyncio.sleep(_BACKGROUND_POLL_S if background else _POLL_S)
            record = await self._engine.push_status(transfer_id)
        if record.get("outcome") != "success":
            raise MigrationFailed(str(record.get("error") or f"push {transfer_id} {record.get('outcome')}"))
        plan.wire_bytes += int(record.get("wire_bytes", 0))
        plan.block_format = str(record.get("block_format", ""))
        plan.pushed = end

    async def _prime(self, plan: _Plan) -> None:
        """Have the destination load the stages pushed so far into its prefix cache; best effort, within
        ``prime_timeout_s`` (the hand-over copies whatever it did not)."""
        assert self._primer is not None
        stream, end = plan.stream, plan.pushed * self._engine.block_size
        known = (*stream.prompt, *stream.delivered)
        if len(known) <= end:  # the client has not had every token of the pushed blocks yet
            return
        handle = {
            TRANSFER_ID: plan.parts[-1][0],
            PARTS: [list(p) for p in plan.parts],
            BLOCK_FORMAT: plan.block_format,
        }
        request = DecodeRequest(
            RequestId(f"{stream.request_id}#prime-{plan.migration_id}"),
            known[:end],
            known[end],
            stream.sampling,
            handle,
            stream.priority,
        )
        try:
            primed = await asyncio.wait_for(
                self._primer(plan.target, request), self._config.prime_timeout_s + 1
            )
        except Exception as exc:
            log.info("migration %s: priming %s failed: %s", plan.migration_id, plan.target.instance_id, exc)
            return
        plan.primed_blocks = plan.pushed if primed else 0

    async def _pump(self, stream: LiveStream, chunks: AsyncIterator[TokenChunk]) -> None:
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


@dataclass(eq=False)
class _Plan:
    stream: LiveStream
    migration_id: str
    target: MigrationTarget
    parts: list[tuple[str, int]] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    pushed: int = 0  # blocks pushed so far
    wire_bytes: int = 0
    primed_blocks: int = 0  # the destination holds these in its prefix cache
    block_format: str = ""  # how the source stores blocks: the parts are raw images of that layout
    tokens: int = 0
    frozen_at: float | None = None
    handed_at: float | None = None

    def add_part(self) -> str:
        """The next part's transfer id; from here on the destination may hold it."""
        transfer_id = f"{self.stream.request_id}/{self.migration_id}/{len(self.parts)}"
        self.parts.append((transfer_id, self.pushed))
        return transfer_id

    def part_ids(self) -> list[str]:
        return [tid for tid, _ in self.parts]

    def figures(self, started: float) -> dict[str, Any]:
        paused = (self.handed_at or time.monotonic()) - self.frozen_at if self.frozen_at is not None else 0.0
        return {
            "stages": len(self.parts),
            "blocks": self.pushed,
            "wire_bytes": self.wire_bytes,
            "primed_blocks": self.primed_blocks,
            "tokens": self.tokens,
            "paused_s": paused,
            "duration_s": time.monotonic() - started,
        }


async def _just_after_a_token(stream: LiveStream) -> None:
    """Wait, briefly, for the engine's next token: a freeze queued right behind it lets that token out and
    holds back the next, a whole step away. The client's gap is then the last push and the destination's
    first step; frozen at any moment, it also held the time since its last token, half a step on average."""
    if stream.finished:
        return
    stream.ticked.clear()
    bound = min(_FREEZE_WAIT_MAX_S, max(_FREEZE_WAIT_MIN_S, 2 * stream.gap_s))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_first(stream.ticked, stream.ended), bound)


def _merge(request_id: RequestId, chunks: list[TokenChunk]) -> TokenChunk | None:
    """Chunks held back during a migration that failed, as one."""
    if not chunks:
        return None
    tokens = tuple(t for c in chunks for t in c.token_ids)
    return TokenChunk(request_id, tokens, chunks[-1].finish_reason, chunks[0].transfer)
