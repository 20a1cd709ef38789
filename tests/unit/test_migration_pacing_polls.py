"""A paced pre-copy stage costs the source's process few status requests: it cannot end before its last layer
starts (``eta_s`` in the push's reply), so the migration asks about it only after that."""

from __future__ import annotations

import time
from dataclasses import replace

from protocol.kv_ops import PushStarted, PushState
from tests.support.migration import DEST, LIVE, RID, ScriptedEngine, produce, start, until

ETA_S = 0.15


class PacedEngine(ScriptedEngine):
    """Background pushes say they take ``ETA_S`` at least; every ``push_status`` is timed."""

    def __init__(self) -> None:
        super().__init__()
        self.started: dict[str, float] = {}
        self.asked: dict[str, list[float]] = {}

    async def push_blocks(self, request_id, transfer_id, destination, blocks, expected, *, background):  # type: ignore[no-untyped-def]
        self.started[transfer_id] = time.monotonic()
        reply: PushStarted = await super().push_blocks(
            request_id, transfer_id, destination, blocks, expected, background=background
        )
        return replace(reply, eta_s=ETA_S) if background else reply

    async def push_status(self, transfer_id: str) -> PushState:
        self.asked.setdefault(transfer_id, []).append(time.monotonic())
        return await super().push_status(transfer_id)


async def test_a_paced_stage_is_asked_about_once_it_can_have_ended() -> None:
    engine = PacedEngine()
    source, stream, tokens, relay = start(engine, final_blocks=1, max_stages=3)
    await produce(stream, tokens, 5)
    await until(lambda: len(stream.delivered) == 5)

    async def on_push(k: int, background: bool) -> None:
        if background:
            await produce(stream, tokens, 2)

    engine.on_push = on_push
    report = await source.migrate(RID, "m1", DEST, LIVE)
    await relay
    assert report.outcome.value == "moved", report.error
    stages = [p.transfer_id for p in engine.pushes if p.background]
    assert stages
    for transfer_id in stages:
        assert engine.asked[transfer_id][0] - engine.started[transfer_id] >= ETA_S  # not before it could end
