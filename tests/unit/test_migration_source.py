"""The source side of a live migration (``decode_worker.migration.source``) against a fake engine: the stage
plan, the freeze and the cut, the hand-over and its continuation, and the thaw when a migration fails."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from decode_worker.migration.source import LiveStream, MigrationSource
from kv_transfer.params import BLOCK_FORMAT, IN_FLIGHT, PARTS, TRANSFER_ID
from protocol.config import MigrationConfig, MigrationMode
from protocol.ids import RequestId
from protocol.messages import DecodeRequest, FinishReason, SamplingSpec, TokenChunk
from protocol.migrations import MigrationOutcome, MigrationTarget

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


class FakeEngine:
    """A ``MigrationEngine`` that records its calls. ``fail[k]`` fails the k-th push: ``{"error": ...}`` is
    what push_blocks returns, ``{"outcome": "failed", ...}`` the push's record. ``on_push(k, background)``
    runs at the start of each push, before it returns: the engine keeps stepping meanwhile."""

    def __init__(self, fail: dict[int, dict[str, Any]] | None = None) -> None:
        self.block_size = BS
        self.pushes: list[Push] = []
        self.dropped: list[tuple[str, list[str], str]] = []
        self.fail = fail or {}
        self.on_push: Callable[[int, bool], Awaitable[None]] | None = None
        self._records: dict[str, dict[str, Any]] = {}
        self._polled: set[str] = set()

    async def push_blocks(self, request_id, transfer_id, destination, blocks, expected, *, background):  # type: ignore[no-untyped-def]
        k = len(self.pushes)
        self.pushes.append(Push(transfer_id, blocks, list(expected), background))
        if self.on_push is not None:
            await self.on_push(k, background)
        injected = self.fail.get(k)
        if injected is not None and "outcome" not in injected:
            return injected
        record = injected or {
            "outcome": "success",
            "wire_bytes": 100 * (blocks[1] - blocks[0]),
            "block_format": "fake/4",
        }
        if background:
            self._records[transfer_id] = record
            return {"block_ids": list(range(blocks[1])), "record": None}
        return {"block_ids": list(range(blocks[1])), "record": record}

    async def push_status(self, transfer_id: str) -> dict[str, Any] | None:
        if transfer_id not in self._polled:  # in flight the first time it is asked
            self._polled.add(transfer_id)
            return None
        return self._records[transfer_id]

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
                await asyncio.sleep(0.001)
                yield TokenChunk(RID, (tok,), finish)
                if finish is not None:
                    return
        finally:
            self.closed = True  # the request ended or was aborted in the engine


async def until(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.001)


async def collect(relay: AsyncIterator[TokenChunk]) -> list[TokenChunk]:
    return [chunk async for chunk in relay]


def start(
    engine: FakeEngine, prompt_len: int = 10, budget: int = 100, **config: Any
) -> tuple[MigrationSource, LiveStream, Tokens, asyncio.Task[list[TokenChunk]]]:
    source = MigrationSource(engine, "decode-0", MigrationConfig(**config))
    stream = LiveStream(RID, tuple(range(prompt_len)), SamplingSpec(max_tokens=budget + 1), budget)
    tokens = Tokens()
    return source, stream, tokens, asyncio.create_task(collect(source.serve(stream, tokens.chunks())))


async def produce(stream: LiveStream, tokens: Tokens, n: int, finish: FinishReason | None = None) -> list:
    """Have the engine produce ``n`` tokens and wait until the relay's pump read them."""
    target = stream.produced + n
    new = tokens.feed(n, finish)
    await until(lambda: stream.produced >= target)
    return new


def relayed(chunks: list[TokenChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def continuation(chunks: list[TokenChunk]) -> DecodeRequest:
    """The hand-over the relay ended with: a chunk of its own, no tokens, no finish."""
    last = chunks[-1]
    assert last.handover is not None and last.token_ids == () and last.finish_reason is None
    return last.handover.continuation


def final_end(stream: LiveStream, delivered: int) -> int:
    return math.ceil((len(stream.prompt) + delivered - 1) / BS)


async def test_live_migration_hands_over_the_cut_and_drops_later_tokens() -> None:
    engine = FakeEngine()
    source, stream, tokens, relay = start(engine, final_blocks=1, max_stages=3)
    await produce(stream, tokens, 5)
    await until(lambda: len(stream.delivered) == 5)
    after_freeze: list[int] = []

    async def on_push(k: int, background: bool) -> None:
        if background:  # tokens made during the pre-copy still reach the client
            await produce(stream, tokens, 2)
        else:  # tokens made once frozen never do
            after_freeze.extend(await produce(stream, tokens, 3))

    engine.on_push = on_push
    report = await source.migrate(RID, "m1", DEST, LIVE)
    chunks = await relay

    assert report.outcome is MOVED, report.error
    cont, got = continuation(chunks), relayed(chunks)
    assert got == tokens.made[: len(got)] and not set(after_freeze) & set(got)
    assert (*cont.prompt_token_ids, cont.first_token_id) == (*stream.prompt, *got)
    assert cont.sampling.max_tokens == 100 - len(got) + 1
    handle = cont.kv_handle or {}
    parts = handle[PARTS]
    assert [p[0] for p in parts] == [p.transfer_id for p in engine.pushes]
    assert [p[1] for p in parts] == [0] + [p.blocks[1] for p in engine.pushes[:-1]]
    assert handle[TRANSFER_ID] == parts[-1][0]
    final = engine.pushes[-1]
    assert final.background is False and all(p.background for p in engine.pushes[:-1])
    assert final.blocks[1] == final_end(stream, len(got)) == report.blocks
    assert final.expected == list(range(engine.pushes[-2].blocks[1]))
    assert report.stages == len(engine.pushes) == 2 and not engine.dropped


# With no pre-copy stage (the KV is few blocks), the one push runs before the hand-over: if it fails, the
# request goes on here.
@pytest.mark.parametrize("failure", [{"error": "link lost"}, {"outcome": "failed", "error": "link lost"}])
async def test_failed_final_push_before_the_hand_over_thaws_the_stream(failure: dict[str, Any]) -> None:
    engine = FakeEngine(fail={0: failure})
    source, stream, tokens, relay = start(engine, final_blocks=10, max_stages=3)
    await produce(stream, tokens, 5)
    held: list[int] = []

    async def on_push(k: int, background: bool) -> None:
        if not background:
            held.extend(await produce(stream, tokens, 3))

    engine.on_push = on_push
    report = await source.migrate(RID, "m1", DEST, LIVE)
    assert report.outcome is FAILED and report.error == "link lost"
    await until(lambda: set(held) <= set(stream.delivered))  # the held tokens go out after the thaw
    await produce(stream, tokens, 4, FinishReason.STOP)
    chunks = await relay

    assert relayed(chunks) == tokens.made == stream.delivered
    assert chunks[-1].finish_reason is FinishReason.STOP and all(c.handover is None for c in chunks)
    ids = [p.transfer_id for p in engine.pushes]
    # every part tried is dropped: a push that failed (or timed out) may have left a reservation there
    assert engine.dropped == [(DEST.kv_endpoint, ids, "link lost")]
    assert not source.migrating() and not source.running()


def _served(
    engine: FakeEngine, **config: Any
) -> tuple[MigrationSource, LiveStream, Tokens, list[TokenChunk], asyncio.Task[None]]:
    """A source (pre-copying every full block, up to 3 stages) relaying one stream to a client whose
    chunks collect in the returned list as it reads them."""
    source = MigrationSource(engine, "decode-0", MigrationConfig(final_blocks=1, max_stages=3, **config))
    stream = LiveStream(RID, tuple(range(10)), SamplingSpec(max_tokens=101), 100)
    tokens, got = Tokens(), []

    async def client() -> None:
        async for chunk in source.serve(stream, tokens.chunks()):
            got.append(chunk)

    return source, stream, tokens, got, asyncio.create_task(client())


async def test_live_migration_hands_over_as_its_last_push_starts() -> None:
    """After a pre-copy, the hand-over goes out while the last push runs (the destination loads the earlier
    stages meanwhile and waits for the last, ``IN_FLIGHT``); the request stays in the engine, its blocks
    with it, until that push ends."""
    engine = FakeEngine()
    source, stream, tokens, got, relay = _served(engine, overlap_last_push=True)
    await produce(stream, tokens, 5)
    seen: dict[str, bool] = {}

    async def on_push(k: int, background: bool) -> None:
        if background:
            await produce(stream, tokens, 2)
        else:
            await until(lambda: bool(got) and got[-1].handover is not None)  # the client has it already
            await asyncio.sleep(0.01)
            seen["engine stream open during the last push"] = not tokens.closed

    engine.on_push = on_push
    report = await source.migrate(RID, "m1", DEST, LIVE)
    await relay
    cont = continuation(got)

    assert report.outcome is MOVED and report.error == ""
    assert seen == {"engine stream open during the last push": True}
    handle = cont.kv_handle or {}
    assert handle[IN_FLIGHT] == [engine.pushes[-1].transfer_id] == [handle[PARTS][-1][0]]
    assert handle[BLOCK_FORMAT] == "fake/4" and report.stages == 2 and not engine.dropped
    await until(lambda: tokens.closed)  # then the request is aborted here


async def test_live_migration_without_overlap_hands_over_once_its_last_push_landed() -> None:
    """``overlap_last_push`` off (the default): the client gets the hand-over only after the last push
    ended, and the destination is told nothing is in flight (it loads every part in the step that computes
    the next token)."""
    engine = FakeEngine()
    source, stream, tokens, got, relay = _served(engine, overlap_last_push=False)
    await produce(stream, tokens, 5)
    handed_over_during_last_push: list[bool] = []

    async def on_push(k: int, background: bool) -> None:
        if background:
            await produce(stream, tokens, 2)
        else:
            await asyncio.sleep(0.02)
            handed_over_during_last_push.append(any(c.handover is not None for c in got))

    engine.on_push = on_push
    report = await source.migrate(RID, "m1", DEST, LIVE)
    await relay
    handle = continuation(got).kv_handle or {}
    assert report.outcome is MOVED and report.stages == 2
    assert handed_over_during_last_push == [False]
    assert IN_FLIGHT not in handle and handle[PARTS][-1][0] == engine.pushes[-1].transfer_id


@pytest.mark.parametrize("failure", [{"error": "link lost"}, {"outcome": "failed", "error": "link lost"}])
async def test_last_push_that_fails_after_the_hand_over_is_dropped_on_the_destination(
    failure: dict[str, Any],
) -> None:
    """The request moved: the destination gives up waiting for the dropped part and recomputes its KV."""
    engine = FakeEngine(fail={1: failure})
    source, stream, tokens, relay = start(engine, final_blocks=1, max_stages=3, overlap_last_push=True)
    await produce(stream, tokens, 5)
    report = await source.migrate(RID, "m1", DEST, LIVE)
    cont = continuation(await relay)

    assert report.outcome is MOVED and "link lost" in report.error
    last = engine.pushes[-1].transfer_id
    assert (cont.kv_handle or {})[IN_FLIGHT] == [last]
    assert engine.dropped == [(DEST.kv_endpoint, [last], "link lost")]
    assert not source.migrating() and not source.running()


async def test_request_that_finishes_during_the_pre_copy_is_not_moved() -> None:
    engine = FakeEngine()
    source, stream, tokens, relay = start(engine, final_blocks=0, max_stages=3)
    await produce(stream, tokens, 5)

    async def on_push(k: int, background: bool) -> None:
        if k == 0:
            await produce(stream, tokens, 2, FinishReason.LENGTH)
            await until(relay.done)

    engine.on_push = on_push
    report = await source.migrate(RID, "m1", DEST, LIVE)
    chunks = relay.result()

    assert report.outcome is FINISHED and "finished before it could move" in report.error
    assert relayed(chunks) == tokens.made and len(tokens.made) == 7
    assert [c.finish_reason for c in chunks].count(FinishReason.LENGTH) == 1 and chunks[-1].finish_reason
    assert all(c.handover is None for c in chunks)
    assert engine.dropped == [(DEST.kv_endpoint, [p.transfer_id for p in engine.pushes], report.error)]


@pytest.mark.parametrize("mode", [STOP_AND_COPY, RECOMPUTE])
async def test_baseline_modes(mode: MigrationMode) -> None:
    engine = FakeEngine()
    source, stream, tokens, relay = start(engine, prompt_len=30, final_blocks=0, max_stages=3)
    await produce(stream, tokens, 6)
    report = await source.migrate(RID, "m1", DEST, mode)
    chunks = await relay

    assert report.outcome is MOVED, report.error
    cont = continuation(chunks)
    assert (*cont.prompt_token_ids, cont.first_token_id) == (*stream.prompt, *tokens.made)
    if mode is RECOMPUTE:
        assert engine.pushes == [] and cont.kv_handle is None and report.stages == 0
    else:
        [push] = engine.pushes
        assert push.blocks == (0, final_end(stream, 6)) and push.background is False
        assert cont.kv_handle == {
            TRANSFER_ID: push.transfer_id,
            PARTS: [[push.transfer_id, 0]],
            BLOCK_FORMAT: "fake/4",  # the destination checks it against its own layout
        }
        assert report.stages == 1


async def test_refused_migrations_leave_the_stream_alone() -> None:
    engine = FakeEngine()
    source, stream, tokens, relay = start(engine, final_blocks=0, max_stages=3)
    await produce(stream, tokens, 3)

    unknown = await source.migrate("req-nope", "m0", DEST, LIVE)
    assert unknown.outcome is FAILED and unknown.error == "request req-nope is not running on decode-0"
    to_self = await source.migrate(RID, "m0", MigrationTarget("decode-0", "x", "y"), LIVE)
    assert to_self.outcome is FAILED and to_self.error == "the destination is the source"

    release = asyncio.Event()

    async def on_push(k: int, background: bool) -> None:
        await release.wait()

    engine.on_push = on_push
    first = asyncio.create_task(source.migrate(RID, "m1", DEST, LIVE))
    await until(lambda: len(engine.pushes) == 1)
    again = await source.migrate(RID, "m2", DEST, LIVE)
    assert again.outcome is FAILED and again.error == f"request {RID} is already migrating (m1)"
    assert source.migrating() == {RID: "m1"}
    assert not engine.dropped and len(engine.pushes) == 1
    await produce(stream, tokens, 2)
    await until(lambda: stream.delivered == tokens.made)  # the stream still flows
    release.set()
    assert (await first).outcome is MOVED
    assert relayed(await relay) == tokens.made


async def test_live_stage_plan_precopies_full_blocks_and_caps_the_stages() -> None:
    engine = FakeEngine()
    source, stream, tokens, relay = start(engine, prompt_len=160, final_blocks=4, max_stages=3)
    await produce(stream, tokens, 2)  # KV of 161 tokens: 40 full blocks and a partial one

    async def on_push(k: int, background: bool) -> None:
        if background:  # a fast request: 6 blocks fill during each stage, so it never gets within 4
            await produce(stream, tokens, 6 * BS)

    engine.on_push = on_push
    report = await source.migrate(RID, "m1", DEST, LIVE)
    chunks = await relay

    assert report.outcome is MOVED, report.error
    first, *rest = engine.pushes
    assert first.background is True and first.blocks == (0, 40)
    assert [p.background for p in rest] == [True, True, False]
    for before, after in zip(engine.pushes, rest, strict=False):
        assert after.blocks[0] == before.blocks[1]
    delivered = len(relayed(chunks))
    assert delivered == 2 + 3 * 6 * BS
    assert engine.pushes[-1].blocks[1] == final_end(stream, delivered) and report.stages == 4


# A migration retried at once after one that failed while frozen must wait for its own freeze: cutting before
# the relay has sent the thawed tokens would leave them out of the continuation, and the client would get
# them twice. Python 3.11's ``asyncio.wait_for`` runs ``_move`` in a new task, which hides a stale cut; from
# 3.12 on it awaits the coroutine in place, patched in here to that behaviour.
async def test_retry_right_after_a_failed_migration_cuts_after_the_thawed_tokens(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    async def wait_for_312(aw: Awaitable[Any], timeout: float) -> Any:
        async with asyncio.timeout(timeout):
            return await aw

    monkeypatch.setattr(asyncio, "wait_for", wait_for_312)
    engine = FakeEngine(fail={0: {"error": "link lost"}})
    source, stream, tokens, relay = start(engine, final_blocks=10, max_stages=3)
    await produce(stream, tokens, 5)

    async def on_push(k: int, background: bool) -> None:
        if not background:
            await produce(stream, tokens, 3)  # held back, then thawed

    engine.on_push = on_push
    assert (await source.migrate(RID, "m1", DEST, LIVE)).outcome is FAILED
    report = await source.migrate(RID, "m2", DEST, RECOMPUTE)
    chunks = await relay

    assert report.outcome is MOVED
    cont = continuation(chunks)
    assert (*cont.prompt_token_ids, cont.first_token_id) == (*stream.prompt, *relayed(chunks))


# When the relay ends during the final push (the client went away, or the engine failed), the request moved
# nowhere: the report must not say MOVED, and the parts that landed on the destination are dropped.
async def test_relay_that_ends_during_the_final_push_is_not_reported_moved() -> None:
    engine = FakeEngine()
    source, stream, tokens, relay = start(engine, final_blocks=10, max_stages=3)
    await produce(stream, tokens, 5)

    async def on_push(k: int, background: bool) -> None:
        if not background:
            relay.cancel()  # the client disconnects
            await until(relay.done)

    engine.on_push = on_push
    report = await source.migrate(RID, "m1", DEST, LIVE)

    assert report.outcome is not MOVED
    assert engine.dropped and engine.dropped[0][1] == [p.transfer_id for p in engine.pushes]


async def test_caller_that_gives_up_mid_freeze_leaves_the_request_flowing_here() -> None:
    """The controller's call to ``migrate`` is cancelled (its deadline, or the controller went away) while the
    stream is frozen: the stream thaws, nothing is lost, and the parts pushed so far are dropped."""
    engine = FakeEngine()
    source, stream, tokens, relay = start(engine, final_blocks=10, max_stages=3)
    await produce(stream, tokens, 5)
    stuck = asyncio.Event()

    async def on_push(k: int, background: bool) -> None:
        if not background:
            await produce(stream, tokens, 2)  # held back while frozen
            await stuck.wait()  # the final push never answers

    engine.on_push = on_push
    caller = asyncio.create_task(source.migrate(RID, "m1", DEST, LIVE))
    await until(lambda: len(engine.pushes) == 1)
    caller.cancel()
    await until(lambda: bool(engine.dropped))
    await produce(stream, tokens, 3, FinishReason.LENGTH)
    chunks = await relay
    assert relayed(chunks) == tokens.made and all(c.handover is None for c in chunks)
    assert engine.dropped[0][1] == [p.transfer_id for p in engine.pushes]
    assert source.migrating() == {}


async def test_a_request_still_queued_in_the_engine_is_not_offered_for_migration() -> None:
    """The policy moves running requests only: one the engine has not scheduled yet holds no blocks."""
    engine = FakeEngine()
    source, stream, tokens, relay = start(engine, prompt_len=10)
    assert source.kv_of_running() == []
    await produce(stream, tokens, 3)  # its next step holds the KV of 10 + 3 tokens: 4 blocks of 4
    assert source.kv_of_running() == [(RID, 4, 0)]
    await produce(stream, tokens, 1, FinishReason.STOP)
    await relay
    assert source.kv_of_running() == []


async def test_a_requests_priority_is_reported_for_the_policy_and_moves_with_it() -> None:
    engine = FakeEngine()
    source = MigrationSource(engine, "decode-0", MigrationConfig(final_blocks=1, max_stages=3))
    stream = LiveStream(RID, tuple(range(10)), SamplingSpec(max_tokens=101), 100, priority=3)
    tokens = Tokens()
    relay = asyncio.create_task(collect(source.serve(stream, tokens.chunks())))
    await produce(stream, tokens, 3)
    assert source.kv_of_running() == [(RID, 4, 3)]
    report = await source.migrate(RID, "m1", DEST, LIVE)
    assert report.outcome is MOVED and continuation(await relay).priority == 3


async def test_the_freeze_comes_right_after_the_engines_next_token() -> None:
    """A request frozen at any moment made its client wait, on top of the hand-over, for the time since its
    last token. The source waits for the engine's next token, lets it out, and holds back the ones after."""
    engine = FakeEngine()
    source, stream, tokens, relay = start(engine, final_blocks=100, max_stages=3)  # no pre-copy stage
    await produce(stream, tokens, 3)
    await asyncio.sleep(0.15)  # the engine's pace: a token every 150 ms
    await produce(stream, tokens, 1)
    late: list[int] = []

    async def on_push(k: int, background: bool) -> None:  # tokens made once frozen never reach the client
        late.extend(await produce(stream, tokens, 2))

    engine.on_push = on_push
    migrating = asyncio.create_task(source.migrate(RID, "m1", DEST, LIVE))
    await asyncio.sleep(0.05)
    assert not engine.pushes, "frozen before the engine's next token came"
    nxt = await produce(stream, tokens, 1)
    report = await migrating
    chunks = await relay

    assert report.outcome is MOVED, report.error
    assert relayed(chunks) == tokens.made[:5] and relayed(chunks)[-1] == nxt[0]
    assert late and not set(late) & set(relayed(chunks))
    assert continuation(chunks).first_token_id == nxt[0]


async def test_a_quiet_engine_does_not_hold_up_the_freeze_for_long() -> None:
    engine = FakeEngine()
    source, stream, tokens, relay = start(engine, final_blocks=100, max_stages=3)
    await produce(stream, tokens, 4)
    started = asyncio.get_running_loop().time()
    report = await source.migrate(RID, "m1", DEST, LIVE)  # the engine makes no token meanwhile
    waited = asyncio.get_running_loop().time() - started
    chunks = await relay

    assert report.outcome is MOVED, report.error
    assert relayed(chunks) == tokens.made[:4]
    assert waited < 1.0, f"the freeze waited {waited:.2f} s for a token that never came"


async def test_the_destination_primes_its_cache_with_the_precopied_stages_while_tokens_still_flow() -> None:
    """After the pre-copy, the destination is asked to load the pushed stages (their blocks' tokens, all the
    parts so far) while the client keeps getting tokens from here; the pause comes only after it."""
    engine = FakeEngine()
    stream = LiveStream(RID, tuple(range(30)), SamplingSpec(max_tokens=101), 100)
    tokens = Tokens()
    asked: list[tuple[MigrationTarget, DecodeRequest, int]] = []

    async def primer(target: MigrationTarget, request: DecodeRequest) -> bool:
        delivered = len(stream.delivered)
        await produce(stream, tokens, 2)  # the engine goes on while the destination primes
        await until(lambda: len(stream.delivered) == delivered + 2)
        asked.append((target, request, delivered))
        return True

    source = MigrationSource(engine, "decode-0", MigrationConfig(final_blocks=4), primer=primer)
    relay = asyncio.create_task(collect(source.serve(stream, tokens.chunks())))
    await produce(stream, tokens, 3)  # KV of 32 tokens: 8 full blocks
    await until(lambda: len(stream.delivered) == 3)
    report = await source.migrate(RID, "m1", DEST, LIVE)
    chunks = await relay

    assert report.outcome is MOVED, report.error
    assert len(asked) == 1
    target, request, _ = asked[0]
    known = (*stream.prompt, *tokens.made)
    assert target == DEST and request.request_id != RID
    assert request.prompt_token_ids == known[:32] and request.first_token_id == known[32]
    assert request.kv_handle == {
        TRANSFER_ID: "req-1/m1/0",
        PARTS: [["req-1/m1/0", 0]],
        BLOCK_FORMAT: "fake/4",
    }
    assert report.primed_blocks == 8
    # the two tokens made while priming reached the client before the cut
    assert len(relayed(chunks[:-1])) == 5 and continuation(chunks).first_token_id == tokens.made[4]


@pytest.mark.parametrize("trouble", ["raises", "hangs", "declines"])
async def test_a_destination_that_cannot_prime_still_gets_the_request(trouble: str) -> None:
    engine = FakeEngine()

    async def primer(target: MigrationTarget, request: DecodeRequest) -> bool:
        if trouble == "raises":
            raise RuntimeError("destination gone")
        if trouble == "hangs":
            await asyncio.sleep(60)
        return False

    stream = LiveStream(RID, tuple(range(30)), SamplingSpec(max_tokens=101), 100)
    tokens = Tokens()
    config = MigrationConfig(final_blocks=4, prime_timeout_s=0.05)
    source = MigrationSource(engine, "decode-0", config, primer=primer)
    relay = asyncio.create_task(collect(source.serve(stream, tokens.chunks())))
    await produce(stream, tokens, 4)  # KV of 33 tokens: 8 full blocks, one more pushed in the pause
    await until(lambda: len(stream.delivered) == 4)
    report = await source.migrate(RID, "m1", DEST, LIVE)
    chunks = await relay

    assert report.outcome is MOVED and report.primed_blocks == 0
    assert [p.blocks for p in engine.pushes] == [(0, 8), (8, 9)]
    assert continuation(chunks).kv_handle[PARTS] == [["req-1/m1/0", 0], ["req-1/m1/1", 8]]  # type: ignore[index]
    assert relayed(chunks[:-1]) == tokens.made[:4]
