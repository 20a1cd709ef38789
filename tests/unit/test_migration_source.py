"""The source side of a live migration (``decode_worker.migration.source``) against a scripted engine: the
stage plan, the freeze and the cut, the hand-over and its continuation, priming. (What happens when a
migration fails is ``test_migration_failures.py``.)"""

from __future__ import annotations

import asyncio

import pytest

from decode_worker.migration.source import MigrationSource
from decode_worker.migration.stream import LiveStream, StreamRelay
from protocol.config import MigrationConfig, MigrationMode
from protocol.kv_handle import KVHandle, KVPart
from protocol.messages import DecodeRequest, FinishReason, Handover, MigrationTarget, SamplingSpec
from tests.support.migration import (
    BS,
    DEST,
    LIVE,
    MOVED,
    RECOMPUTE,
    RID,
    STOP_AND_COPY,
    ScriptedEngine,
    Tokens,
    collect,
    continuation,
    final_end,
    handed_over,
    produce,
    relayed,
    serve,
    settle,
    start,
    until,
)


async def test_live_migration_hands_over_the_cut_and_drops_later_tokens() -> None:
    engine = ScriptedEngine()
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
    assert cont.kv_handle is not None and cont.kv_handle.migrated
    parts = cont.kv_handle.parts
    assert [p.transfer_id for p in parts] == [p.transfer_id for p in engine.pushes]
    assert [p.first_block for p in parts] == [0] + [p.blocks[1] for p in engine.pushes[:-1]]
    final = engine.pushes[-1]
    assert final.background is False and all(p.background for p in engine.pushes[:-1])
    assert final.blocks[1] == final_end(stream, len(got)) == report.blocks
    assert final.expected == list(range(engine.pushes[-2].blocks[1]))
    assert report.stages == len(engine.pushes) == 2 and not engine.dropped


async def test_live_migration_hands_over_as_its_last_push_starts() -> None:
    """After a pre-copy, the hand-over goes out while the last push runs (the destination loads the earlier
    stages meanwhile and waits for the last, in flight); the request stays in the engine, its blocks with
    it, until that push ends."""
    engine = ScriptedEngine()
    served = serve(engine, final_blocks=1, max_stages=3, overlap_last_push=True)
    stream, tokens = served.stream, served.tokens
    await produce(stream, tokens, 5)
    seen: dict[str, bool] = {}

    async def on_push(k: int, background: bool) -> None:
        if background:
            await produce(stream, tokens, 2)
        else:
            await until(stream.ended.is_set)  # the client has the hand-over, the relay has returned
            await settle()  # a relay that did not wait for this push would close the engine's stream now
            seen["engine stream open during the last push"] = not tokens.closed

    engine.on_push = on_push
    report = await served.source.migrate(RID, "m1", DEST, LIVE)
    cont = continuation(await served.relay)

    assert report.outcome is MOVED and report.error == ""
    assert seen == {"engine stream open during the last push": True}
    assert cont.kv_handle is not None
    assert (
        cont.kv_handle.in_flight == {engine.pushes[-1].transfer_id} == {cont.kv_handle.parts[-1].transfer_id}
    )
    assert cont.kv_handle.block_format == "fake/4" and report.stages == 2 and not engine.dropped
    await until(lambda: tokens.closed)  # then the request is aborted here


async def test_live_migration_without_overlap_hands_over_once_its_last_push_landed() -> None:
    """``overlap_last_push`` off (the default): the client gets the hand-over only after the last push
    ended, and the destination is told nothing is in flight (it loads every part in the step that computes
    the next token)."""
    engine = ScriptedEngine()
    served = serve(engine, final_blocks=1, max_stages=3, overlap_last_push=False)
    stream, tokens = served.stream, served.tokens
    got: list[object] = []
    await produce(stream, tokens, 5)
    handed_over_during_last_push: list[bool] = []

    async def on_push(k: int, background: bool) -> None:
        if background:
            await produce(stream, tokens, 2)
        else:
            await settle()
            handed_over_during_last_push.append(stream.ended.is_set())

    engine.on_push = on_push
    report = await served.source.migrate(RID, "m1", DEST, LIVE)
    got = list(await served.relay)
    handle = continuation(got).kv_handle  # type: ignore[arg-type]
    assert report.outcome is MOVED and report.stages == 2
    assert handed_over_during_last_push == [False]
    assert handle is not None and not handle.in_flight
    assert handle.parts[-1].transfer_id == engine.pushes[-1].transfer_id


@pytest.mark.parametrize("mode", [STOP_AND_COPY, RECOMPUTE])
async def test_baseline_modes(mode: MigrationMode) -> None:
    engine = ScriptedEngine()
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
        # the destination checks the block format against its own layout
        assert cont.kv_handle == KVHandle((KVPart(push.transfer_id, 0),), "fake/4", migrated=True)
        assert report.stages == 1


async def test_live_stage_plan_precopies_full_blocks_and_caps_the_stages() -> None:
    engine = ScriptedEngine()
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


async def test_a_request_still_queued_in_the_engine_is_not_offered_for_migration() -> None:
    """The policy moves running requests only: one the engine has not scheduled yet holds no blocks."""
    served = serve(ScriptedEngine(), prompt_len=10)
    assert served.streams.kv_of_running(BS) == []
    await produce(served.stream, served.tokens, 3)  # its next step holds the KV of 13 tokens: 4 blocks of 4
    assert served.streams.kv_of_running(BS) == [(RID, 4, 0)]
    await produce(served.stream, served.tokens, 1, FinishReason.STOP)
    await served.relay
    assert served.streams.kv_of_running(BS) == []


async def test_a_requests_priority_is_reported_for_the_policy_and_moves_with_it() -> None:
    served = serve(ScriptedEngine(), priority=3, final_blocks=1, max_stages=3)
    await produce(served.stream, served.tokens, 3)
    assert served.streams.kv_of_running(BS) == [(RID, 4, 3)]
    report = await served.source.migrate(RID, "m1", DEST, LIVE)
    assert report.outcome is MOVED and continuation(await served.relay).priority == 3


async def test_the_freeze_comes_right_after_the_engines_next_token() -> None:
    """A request frozen at any moment made its client wait, on top of the hand-over, for the time since its
    last token. The source waits for the engine's next token, lets it out, and holds back the ones after."""
    engine = ScriptedEngine()
    source, stream, tokens, relay = start(engine, final_blocks=100, max_stages=3)  # no pre-copy stage
    await produce(stream, tokens, 4)
    stream.gap_s = 0.5  # the engine's pace: a token every 500 ms (the source waits up to twice that)
    late: list[int] = []

    async def on_push(k: int, background: bool) -> None:  # tokens made once frozen never reach the client
        late.extend(await produce(stream, tokens, 2))

    engine.on_push = on_push
    migrating = asyncio.create_task(source.migrate(RID, "m1", DEST, LIVE))
    await until(lambda: not stream.ticked.is_set())  # the source waits for the next token
    assert not engine.pushes, "frozen before the engine's next token came"
    nxt = await produce(stream, tokens, 1)
    report = await migrating
    chunks = await relay

    assert report.outcome is MOVED, report.error
    assert relayed(chunks) == tokens.made[:5] and relayed(chunks)[-1] == nxt[0]
    assert late and not set(late) & set(relayed(chunks))
    assert continuation(chunks).first_token_id == nxt[0]


async def test_a_quiet_engine_does_not_hold_up_the_freeze_for_long() -> None:
    engine = ScriptedEngine()
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
    engine = ScriptedEngine()
    stream = LiveStream(RID, tuple(range(30)), SamplingSpec(max_tokens=101), 100)
    tokens = Tokens()
    asked: list[tuple[MigrationTarget, DecodeRequest, int]] = []

    async def primer(target: MigrationTarget, request: DecodeRequest) -> bool:
        delivered = len(stream.delivered)
        await produce(stream, tokens, 2)  # the engine goes on while the destination primes
        await until(lambda: len(stream.delivered) == delivered + 2)
        asked.append((target, request, delivered))
        return True

    streams = StreamRelay(last_push_wait_s=60)
    source = MigrationSource(engine, streams, "decode-0", MigrationConfig(final_blocks=4), primer=primer)
    relay = asyncio.create_task(collect(streams.serve(stream, tokens.chunks())))
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
    assert request.kv_handle == KVHandle((KVPart("req-1/m1/0", 0),), "fake/4", migrated=True)
    assert report.primed_blocks == 8
    # the two tokens made while priming reached the client before the cut
    assert len(relayed(chunks[:-1])) == 5 and continuation(chunks).first_token_id == tokens.made[4]
    assert isinstance(chunks[-1], Handover) and not handed_over(chunks[:-1])


@pytest.mark.parametrize("trouble", ["raises", "hangs", "declines"])
async def test_a_destination_that_cannot_prime_still_gets_the_request(trouble: str) -> None:
    never = asyncio.Event()

    async def primer(target: MigrationTarget, request: DecodeRequest) -> bool:
        if trouble == "raises":
            raise RuntimeError("destination gone")
        if trouble == "hangs":
            await never.wait()
        return False

    engine = ScriptedEngine()
    served = serve(engine, prompt_len=30, primer=primer, final_blocks=4, prime_timeout_s=0.05)
    await produce(served.stream, served.tokens, 4)  # KV of 33 tokens: 8 full blocks, one more in the pause
    await until(lambda: len(served.stream.delivered) == 4)
    report = await served.source.migrate(RID, "m1", DEST, LIVE)
    chunks = await served.relay

    assert report.outcome is MOVED and report.primed_blocks == 0
    assert [p.blocks for p in engine.pushes] == [(0, 8), (8, 9)]
    handle = continuation(chunks).kv_handle
    assert handle is not None and handle.parts == (KVPart("req-1/m1/0", 0), KVPart("req-1/m1/1", 8))
    assert relayed(chunks[:-1]) == served.tokens.made[:4]
