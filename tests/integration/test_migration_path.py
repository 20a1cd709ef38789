"""Live migration end to end below the engine: the controller's coordinator asks the source decode worker to
move a request its client is streaming; the source pre-copies the KV through the real exchange, freezes the
stream, hands over, and the front door's router continues the stream on the destination. On fake engines
over an in-process fabric (``FakeCluster``): no Ray, no vLLM."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from engine.fake_model import LatencyModel
from protocol.config import MigrationMode
from protocol.lifecycle import RequestState
from protocol.migrations import MigrationOutcome
from protocol.snapshots import InstanceState, Role
from tests.integration.test_request_path import colocated
from tests.support.fake_cluster import FakeCluster

pytestmark = pytest.mark.fakes

PROMPT = tuple(range(300, 350))  # 50 tokens: 13 blocks of 4, so a live migration pre-copies before it pauses
SLOW = LatencyModel(decode=((1, 0.004), (32, 0.008)))  # long enough streams for a migration mid-way


async def _stream_with_moves(
    cluster: FakeCluster, request_id: str, n: int, moves: list[int], mode: MigrationMode
) -> tuple[list[int], list[object]]:
    """Stream ``n`` tokens of ``PROMPT``; once the client has ``moves[k]`` tokens, migrate the request to the
    other decode worker (each move ends before the next). Returns the client's tokens and the coordinator's
    entries."""
    tokens: list[int] = []
    entries: list[object] = []
    pending = list(moves)
    moving: asyncio.Task[object] | None = None
    async for chunk in cluster.stream(PROMPT, n, request_id=request_id):
        tokens.extend(chunk.token_ids)
        if moving is not None and moving.done():
            entries.append(moving.result())
            moving = None
        if moving is None and pending and len(tokens) >= pending[0]:
            pending.pop(0)
            source = cluster.requests.get(request_id).decode_instance  # type: ignore[union-attr]
            destination = "decode-1" if source == "decode-0" else "decode-0"
            moving = asyncio.create_task(
                cluster.coordinator.migrate(request_id, destination, mode=mode.value)
            )
    if moving is not None:
        entries.append(await moving)
    return tokens, entries


@pytest.mark.parametrize("mode", list(MigrationMode))
async def test_a_migrated_request_gives_the_client_the_unmigrated_tokens(mode: MigrationMode) -> None:
    async with FakeCluster(decode=2, latency=SLOW) as cluster:
        tokens, entries = await _stream_with_moves(cluster, "moved", 120, [10], mode)
        assert tokens == colocated(PROMPT, 120), "the client's stream lost, repeated or changed tokens"
        (entry,) = entries
        report = entry.report  # type: ignore[attr-defined]
        assert report.outcome is MigrationOutcome.MOVED, report.error
        if mode is MigrationMode.LIVE:
            assert report.stages >= 2, "a pre-copy stage, then the last push"
        if mode is MigrationMode.RECOMPUTE:
            assert report.stages == 0
        assert RequestState.MIGRATING in cluster.states("moved")
        assert cluster.requests.get("moved").decode_instance == entry.destination  # type: ignore[attr-defined,union-attr]
        await cluster.wait_idle()


async def test_a_request_moved_three_times_back_and_forth_still_gets_every_token_once() -> None:
    async with FakeCluster(decode=2, latency=SLOW) as cluster:
        tokens, entries = await _stream_with_moves(cluster, "thrice", 150, [10, 40, 70], MigrationMode.LIVE)
        assert tokens == colocated(PROMPT, 150)
        assert [e.report.outcome for e in entries] == [MigrationOutcome.MOVED] * 3  # type: ignore[attr-defined]
        assert cluster.states("thrice").count(RequestState.MIGRATING) == 3
        await cluster.wait_idle()


async def test_a_drain_moves_every_request_off_a_decode_worker_and_loses_none() -> None:
    async with FakeCluster(decode=2, latency=SLOW, overrides={"migration.max_concurrent": 1}) as cluster:
        cluster.coordinator.cordon("decode-1")  # both requests start on decode-0
        await cluster.wait_for(
            "decode-1 out of dispatch", lambda: len(cluster.router.snapshot.live(Role.DECODE)) == 1
        )
        prompts = [tuple(range(i, i + 40)) for i in (7, 900)]
        clients = [
            asyncio.create_task(cluster.generate(p, 150, request_id=f"drained-{i}"))
            for i, p in enumerate(prompts)
        ]
        await cluster.wait_for(
            "both decoding on decode-0", lambda: len(cluster.worker("decode-0").running_requests()) == 2
        )
        await cluster.wait_for(
            "both reported", lambda: len(cluster.registry.snapshot(0).by_id("decode-0").requests) == 2
        )  # type: ignore[union-attr]
        cluster.coordinator.uncordon("decode-1")
        result = await cluster.coordinator.drain("decode-0", timeout_s=30)
        assert (result.moved, result.failed, result.remaining) == (2, 0, 0)
        for (tokens, finish), prompt in zip(await asyncio.gather(*clients), prompts, strict=True):
            assert tokens == colocated(prompt, 150) and finish == "length"
        assert cluster.registry.snapshot(0).by_id("decode-0").state is InstanceState.CORDONED  # type: ignore[union-attr]
        await cluster.wait_idle()


async def test_a_live_migration_says_where_it_stands_and_each_worker_which_requests_it_holds() -> None:
    """What an operator (and the chaos suite) reads while a request moves: the source's migration goes
    from its pre-copy to its freeze, and the request is held first by the source, then by the destination."""
    async with FakeCluster(decode=2, latency=SLOW) as cluster:
        phases: list[str] = []
        holders: list[str] = []

        async def watch() -> None:
            while True:
                for name in ("decode-0", "decode-1"):
                    worker = cluster.worker(name)
                    phase = worker.migration_phases().get("watched")
                    if phase and phase not in phases:
                        phases.append(phase)
                    if "watched" in worker.requests() and name not in holders:
                        holders.append(name)
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        tokens, _ = await _stream_with_moves(cluster, "watched", 120, [10], MigrationMode.LIVE)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        assert tokens == colocated(PROMPT, 120)
        assert phases[:2] == ["precopy", "frozen"], phases
        assert len(holders) == 2, f"held by {holders}: the source, then the destination"
        await cluster.wait_idle()
