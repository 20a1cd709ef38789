"""The source side of a live migration.

A migration (``MigrationSource.migrate``) pushes a running request's KV in stages while its stream flows
(``policy.precopy`` says which blocks each stage copies: whole blocks only, which a running request never
rewrites). When few blocks are left, or after the stage limit, the stream freezes (``stream.LiveStream``):
from then on the client gets nothing from here, and the cut is every token it already has. The last blocks
(the partial one included) are pushed while the engine goes on (tokens past the cut never reach the client),
and the relay yields a ``Handover`` once that push has landed (the destination then loads every part in the
step that computes the next token), then returns, which aborts the request here and frees its blocks. With
``overlap_last_push`` (and an earlier stage) the ``Handover`` goes out as the last push starts instead, and
the relay returns once it has ended: the destination copies the earlier stages in meanwhile, and recomputes
the request if the last push never lands. If anything fails before the hand-over, the stream thaws (the
tokens held back go out) and the request goes on here: it runs on exactly one worker either way.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from decode_worker.migration.stream import LiveStream, StreamRelay, first_of
from policy.precopy import Stage, last_push, next_precopy
from protocol.config import MigrationConfig, MigrationMode
from protocol.engine import MigratableEngine
from protocol.ids import RequestId
from protocol.kv_handle import KVHandle, KVPart
from protocol.messages import DecodeRequest, Handover, MigrationTarget
from protocol.migrations import MigrationOutcome, MigrationReport

log = logging.getLogger(__name__)
_POLL_S = 0.002  # how often the last push is polled: it is on the hand-over's critical path
_BACKGROUND_POLL_S = 0.02  # a pre-copy stage: off the critical path
# how long the freeze waits for the engine's next token: twice the last gap between two, within these bounds
_FREEZE_WAIT_MIN_S, _FREEZE_WAIT_MAX_S = 0.02, 0.5

# asks the destination to load the pre-copied stages into its prefix cache (``DecodeWorker.prime``)
Primer = Callable[[MigrationTarget, DecodeRequest], Awaitable[bool]]


class MigrationFailed(Exception):
    pass


class MigrationSource:
    def __init__(
        self,
        engine: MigratableEngine,
        streams: StreamRelay,
        instance_id: str,
        config: MigrationConfig,
        primer: Primer | None = None,
    ) -> None:
        self._engine = engine
        self._streams = streams
        self._primer = primer
        self._instance_id = instance_id
        self._config = config
        self._moves: dict[str, tuple[_Migration, asyncio.Future[None]]] = {}  # request -> (it, its move)
        self._background: set[asyncio.Future[None]] = set()

    def cancel(self, request_id: str) -> bool:
        """Abort the migration of ``request_id`` wherever it is; before the hand-over the request goes on
        here (the stream thaws, the parts pushed so far are dropped). False if none is in flight."""
        move = self._moves[request_id][1] if request_id in self._moves else None
        if move is None or move.done():
            return False
        move.cancel()
        return True

    def migrating(self) -> dict[str, str]:
        return {rid: moving.migration_id for rid, (moving, _) in self._moves.items()}

    def phases(self) -> dict[str, str]:
        """Where each migration in flight stands, by request: ``precopy`` (stages pushed while the stream
        flows), ``frozen`` (the client's stream is paused for the last push) or ``handed_over`` (the
        destination serves the request; the last push may still be landing)."""
        return {rid: moving.phase for rid, (moving, _) in self._moves.items()}

    @property
    def cleanups(self) -> int:
        """Drops of abandoned migrations' parts still on their way (leak check)."""
        return sum(1 for task in self._background if not task.done())

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
            running = self._moves[request_id][0].migration_id
            return replace(report, error=f"request {request_id} is already migrating ({running})")
        if target.instance_id == self._instance_id:
            return replace(report, error="the destination is the source")
        moving = _Migration(stream, migration_id, target)
        move = asyncio.ensure_future(self._move(moving, mode))
        self._moves[request_id] = (moving, move)
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
            if moving.handed_at is not None:  # the destination has it; only the last push failed or hangs
                log.warning("migration %s of %s: moved, but %s", migration_id, request_id, error)
                return replace(report, outcome=MigrationOutcome.MOVED, error=error, **moving.figures(started))
            if moving.frozen_at is not None:
                stream.thaw()
            if moving.parts:
                with contextlib.suppress(Exception):
                    await self._engine.drop_pushed(target.kv_endpoint, moving.part_ids(), error)
            outcome = MigrationOutcome.FINISHED if stream.finished else MigrationOutcome.FAILED
            log.info(
                "migration %s of %s to %s: %s (%s)",
                migration_id,
                request_id,
                target.instance_id,
                outcome.value,
                error,
            )
            return replace(report, outcome=outcome, error=error, **moving.figures(started))
        finally:
            self._moves.pop(request_id, None)
            if not move.done() and moving.handed_at is None:  # the caller went away: stop, thaw, drop
                move.cancel()
                if moving.frozen_at is not None:
                    stream.thaw()
                if moving.parts:
                    drop = self._engine.drop_pushed(
                        target.kv_endpoint, moving.part_ids(), "migration abandoned"
                    )
                    self._background.add(task := asyncio.ensure_future(drop))
                    task.add_done_callback(self._background.discard)
        log.info("migration %s of %s to %s: moved", migration_id, request_id, target.instance_id)
        return replace(report, outcome=MigrationOutcome.MOVED, **moving.figures(started))

    async def _move(self, moving: _Migration, mode: MigrationMode) -> None:
        stream, bs = moving.stream, self._engine.block_size
        # A request still waiting for its KV or its first step here has nothing to move yet: wait for its
        # first token (the migration's deadline bounds the wait).
        await stream.started.wait()
        if mode is MigrationMode.LIVE:
            while not stream.finished and (
                stage := next_precopy(
                    stream.kv_tokens(stream.produced), moving.pushed, len(moving.parts), bs, self._config
                )
            ):
                await self._push(moving, moving.add_part(stage.first_block), stage, background=True)
            if moving.parts and self._primer is not None and self._config.prime_destination:
                await self._prime(moving)
        await _just_after_a_token(stream)
        moving.frozen_at = time.monotonic()
        freeze = stream.freeze()
        # Once the relay takes the freeze, ``delivered`` is the cut: all the client gets from this worker.
        await first_of(freeze.done, stream.ended)
        if stream.finished:
            raise MigrationFailed(f"request {stream.request_id} finished before it could move")
        if not stream.delivered:
            raise MigrationFailed(f"request {stream.request_id} has no token yet; nothing to migrate")
        handle: KVHandle | None = None
        last: asyncio.Future[None] | None = None
        if mode is not MigrationMode.RECOMPUTE:
            stage = last_push(stream.kv_tokens(len(stream.delivered)), moving.pushed, bs)
            if (
                stage is not None
                and mode is MigrationMode.LIVE
                and moving.parts
                and self._config.overlap_last_push
            ):
                # Hand over as the last push starts: the destination copies the earlier stages into its
                # blocks while the last one travels (it waits for it, and recomputes if it never lands).
                # The relay waits for this push before it ends, and so before the abort that frees the
                # request's blocks here.
                tid = moving.add_part(stage.first_block)  # named in the hand-over: added before it leaves
                last = asyncio.ensure_future(self._push(moving, tid, stage, background=False))
                stream.last_push = last
            elif stage is not None:
                await self._push(moving, moving.add_part(stage.first_block), stage, background=False)
            if stream.ended.is_set():  # the client left or the engine failed during the last push
                if last is not None:  # let it end before its part is dropped
                    await asyncio.wait({last}, timeout=self._config.timeout_s)
                raise MigrationFailed(f"request {stream.request_id} ended during the final copy")
            in_flight = frozenset({moving.parts[-1].transfer_id}) if last is not None else frozenset()
            handle = moving.handle(in_flight)
        moving.tokens = stream.kv_tokens(len(stream.delivered))
        moving.handed_at = time.monotonic()
        stream.hand_over(Handover(moving.migration_id, moving.target, stream.continuation(handle)))
        if last is not None:
            try:
                await asyncio.shield(last)  # a cancelled migration still lets it end (the relay waits on it)
            except Exception as exc:  # have the destination give up waiting for it, and recompute
                with contextlib.suppress(Exception):
                    await self._engine.drop_pushed(
                        moving.target.kv_endpoint, [moving.parts[-1].transfer_id], str(exc)
                    )
                raise MigrationFailed(f"the last stage failed after the hand-over: {exc}") from exc

    async def _push(self, moving: _Migration, transfer_id: str, stage: Stage, *, background: bool) -> None:
        """Push ``stage`` as part ``transfer_id`` (``_Migration.add_part``); raise ``MigrationFailed`` if it
        fails."""
        stream = moving.stream
        started = await self._engine.push_blocks(
            stream.request_id,
            transfer_id,
            moving.target.kv_endpoint,
            (stage.first_block, stage.end_block),
            moving.block_ids,
            background=background,
        )
        if started.error:
            raise MigrationFailed(started.error)
        moving.block_ids = list(started.block_ids)
        await asyncio.sleep(started.eta_s)  # a paced stage ends no sooner: no use asking before then
        record = None
        while record is None:
            await asyncio.sleep(_BACKGROUND_POLL_S if background else _POLL_S)
            record = (await self._engine.push_status(transfer_id)).record
        if record.get("outcome") != "success":
            raise MigrationFailed(str(record.get("error") or f"push {transfer_id} {record.get('outcome')}"))
        moving.wire_bytes += int(record.get("wire_bytes", 0))
        moving.block_format = str(record.get("block_format", ""))
        moving.pushed = stage.end_block

    async def _prime(self, moving: _Migration) -> None:
        """Have the destination load the stages pushed so far into its prefix cache; best effort, within
        ``prime_timeout_s`` (the hand-over copies whatever it did not)."""
        assert self._primer is not None
        stream, end = moving.stream, moving.pushed * self._engine.block_size
        known = (*stream.prompt, *stream.delivered)
        if len(known) <= end:  # the client has not had every token of the pushed blocks yet
            return
        request = DecodeRequest(
            RequestId(f"{stream.request_id}#prime-{moving.migration_id}"),
            known[:end],
            known[end],
            stream.sampling,
            moving.handle(frozenset()),
            stream.priority,
        )
        try:
            primed = await asyncio.wait_for(
                self._primer(moving.target, request), self._config.prime_timeout_s + 1
            )
        except Exception as exc:
            log.info(
                "migration %s: priming %s failed: %s", moving.migration_id, moving.target.instance_id, exc
            )
            return
        moving.primed_blocks = moving.pushed if primed else 0


@dataclass(eq=False)
class _Migration:
    """One migration's progress, as the source sees it."""

    stream: LiveStream
    migration_id: str
    target: MigrationTarget
    parts: list[KVPart] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    pushed: int = 0  # blocks pushed so far
    wire_bytes: int = 0
    primed_blocks: int = 0  # the destination holds these in its prefix cache
    block_format: str = ""  # how the source stores blocks: the parts are raw images of that layout
    tokens: int = 0
    frozen_at: float | None = None
    handed_at: float | None = None

    def add_part(self, first_block: int) -> str:
        """The next part's transfer id; from here on the destination may hold it."""
        transfer_id = f"{self.stream.request_id}/{self.migration_id}/{len(self.parts)}"
        self.parts.append(KVPart(transfer_id, first_block))
        return transfer_id

    @property
    def phase(self) -> str:
        if self.handed_at is not None:
            return "handed_over"
        return "frozen" if self.frozen_at is not None else "precopy"

    def part_ids(self) -> list[str]:
        return [p.transfer_id for p in self.parts]

    def handle(self, in_flight: frozenset[str]) -> KVHandle:
        return KVHandle(tuple(self.parts), self.block_format, in_flight, migrated=True)

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
        await asyncio.wait_for(first_of(stream.ticked, stream.ended), bound)
