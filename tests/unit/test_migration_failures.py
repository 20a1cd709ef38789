"""A live migration that fails, or that is refused, against a scripted engine: the request goes on where it
was with nothing lost or repeated, and the parts pushed so far are dropped on the destination."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import pytest

from protocol.messages import FinishReason, MigrationTarget
from tests.support.migration import (
    DEST,
    FAILED,
    FINISHED,
    LIVE,
    MOVED,
    RECOMPUTE,
    RID,
    ScriptedEngine,
    continuation,
    handed_over,
    produce,
    relayed,
    serve,
    start,
    until,
)


# With no pre-copy stage (the KV is few blocks), the one push runs before the hand-over: if it fails, the
# request goes on here.
@pytest.mark.parametrize("failure", [{"error": "link lost"}, {"outcome": "failed", "error": "link lost"}])
async def test_failed_final_push_before_the_hand_over_thaws_the_stream(failure: dict[str, Any]) -> None:
    engine = ScriptedEngine(fail={0: failure})
    served = serve(engine, final_blocks=10, max_stages=3)
    source, stream, tokens = served.source, served.stream, served.tokens
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
    chunks = await served.relay

    assert relayed(chunks) == tokens.made == stream.delivered
    assert chunks[-1].finish_reason is FinishReason.STOP and not handed_over(chunks)  # type: ignore[union-attr]
    ids = [p.transfer_id for p in engine.pushes]
    # every part tried is dropped: a push that failed (or timed out) may have left a reservation there
    assert engine.dropped == [(DEST.kv_endpoint, ids, "link lost")]
    assert not source.migrating() and not served.streams.running()


@pytest.mark.parametrize("failure", [{"error": "link lost"}, {"outcome": "failed", "error": "link lost"}])
async def test_last_push_that_fails_after_the_hand_over_is_dropped_on_the_destination(
    failure: dict[str, Any],
) -> None:
    """The request moved: the destination gives up waiting for the dropped part and recomputes its KV."""
    engine = ScriptedEngine(fail={1: failure})
    served = serve(engine, final_blocks=1, max_stages=3, overlap_last_push=True)
    await produce(served.stream, served.tokens, 5)
    report = await served.source.migrate(RID, "m1", DEST, LIVE)
    cont = continuation(await served.relay)

    assert report.outcome is MOVED and "link lost" in report.error
    last = engine.pushes[-1].transfer_id
    assert cont.kv_handle is not None and cont.kv_handle.in_flight == {last}
    assert engine.dropped == [(DEST.kv_endpoint, [last], "link lost")]
    assert not served.source.migrating() and not served.streams.running()


async def test_request_that_finishes_during_the_pre_copy_is_not_moved() -> None:
    engine = ScriptedEngine()
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
    finishes = [getattr(c, "finish_reason", None) for c in chunks]
    assert finishes.count(FinishReason.LENGTH) == 1 and finishes[-1] is FinishReason.LENGTH
    assert not handed_over(chunks)
    assert engine.dropped == [(DEST.kv_endpoint, [p.transfer_id for p in engine.pushes], report.error)]


async def test_refused_migrations_leave_the_stream_alone() -> None:
    engine = ScriptedEngine()
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


# A migration retried at once after one that failed while frozen must wait for its own freeze: cutting before
# the relay has sent the thawed tokens would leave them out of the continuation, and the client would get
# them twice. Python 3.11's ``asyncio.wait_for`` runs ``_move`` in a new task, which hides a stale cut; from
# 3.12 on it awaits the coroutine in place, patched in here to that behaviour.
async def test_retry_right_after_a_failed_migration_cuts_after_the_thawed_tokens(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    async def wait_for_312(aw: Awaitable[Any], timeout: float) -> Any:
        async with asyncio.timeout(timeout):
            return await aw

    monkeypatch.setattr(asyncio, "wait_for", wait_for_312)
    engine = ScriptedEngine(fail={0: {"error": "link lost"}})
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
    engine = ScriptedEngine()
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
    engine = ScriptedEngine()
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
    assert relayed(chunks) == tokens.made and not handed_over(chunks)
    assert engine.dropped[0][1] == [p.transfer_id for p in engine.pushes]
    assert source.migrating() == {}
