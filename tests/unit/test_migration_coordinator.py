"""The controller's migration coordination against fake decode workers: destination choice, refusals with
clear errors, the record of what ran, drain (cordon, then the policy's DRAIN moves until empty) and the
policy's own moves."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from controller.migrations import MigrationCoordinator
from controller.registry import InstanceRegistry
from protocol.config import MigrationConfig, MigrationMode
from protocol.errors import InvalidRequest
from protocol.ids import InstanceId, RequestId
from protocol.messages import MigrationTarget
from protocol.migrations import MigrationOutcome, MigrationReport
from protocol.snapshots import InstanceSnapshot, InstanceState, Role, RunningKV


@dataclass
class FakeDecodeWorker:
    """A decode worker: ``migrate`` moves a request to the target worker unless told to fail it, and each
    change is reported to the registry as the real worker's next load report would."""

    snapshot: InstanceSnapshot
    registry: InstanceRegistry
    running: list[str] = field(default_factory=list)
    fail: set[str] = field(default_factory=set)
    calls: list[tuple[str, MigrationTarget, str]] = field(default_factory=list)
    reports: bool = True  # False: its load reports lag (a real worker's come every 250 ms)

    def report(self) -> None:
        if not self.reports:
            return
        requests = tuple(RunningKV(RequestId(r), kv_blocks=4) for r in self.running)
        self.registry.report(replace(self.snapshot, requests=requests), time.monotonic())


class FakeFleet:
    def __init__(self, registry: InstanceRegistry) -> None:
        self.workers: dict[str, FakeDecodeWorker] = {}
        self.moved = asyncio.Event()

    async def migrate(
        self, worker: str, rid: str, mid: str, target: MigrationTarget, mode: str, timeout_s: float
    ) -> MigrationReport:
        source = self.workers[worker]
        source.calls.append((rid, target, mode))
        outcome = MigrationOutcome.FAILED if rid in source.fail else MigrationOutcome.MOVED
        if outcome is MigrationOutcome.MOVED:
            source.running.remove(rid)
            destination = self.workers.get(target.actor_name)
            if destination is not None:
                destination.running.append(rid)
                destination.report()
            source.report()
        report = MigrationReport(
            rid,
            mid,
            source.snapshot.instance_id,
            target.instance_id,
            MigrationMode(mode),
            outcome,
            wire_bytes=100,
        )
        self.moved.set()
        return report

    async def running_requests(self, worker: str, timeout_s: float) -> list[str]:
        return list(self.workers[worker].running)


def _inst(iid: str, role: Role = Role.DECODE, used: int = 0, running: int = 0) -> InstanceSnapshot:
    return InstanceSnapshot(
        InstanceId(iid),
        role,
        InstanceState.READY,
        f"actor-{iid}",
        num_running=running,
        kv_blocks_used=used,
        kv_blocks_total=100,
        kv_endpoint=f"127.0.0.1:{len(iid)}",
    )


def _setup(
    *instances: InstanceSnapshot, where: dict[str, str] | None = None, **config: Any
) -> tuple[MigrationCoordinator, dict[str, FakeDecodeWorker]]:
    registry = InstanceRegistry(heartbeat_timeout_s=60)
    fleet = FakeFleet(registry)
    for inst in instances:
        registry.report(inst, time.monotonic())
        fleet.workers[inst.actor_name] = FakeDecodeWorker(inst, registry)
    coordinator = MigrationCoordinator(registry, MigrationConfig(**config), fleet, (where or {}).get)
    return coordinator, fleet.workers


def _running(worker: FakeDecodeWorker, *request_ids: str) -> None:
    worker.running.extend(request_ids)
    worker.report()


def test_manual_migration_goes_to_the_freest_other_decode_worker_and_is_recorded() -> None:
    c, actors = _setup(
        _inst("decode-0", used=90, running=9),
        _inst("decode-1", used=50, running=5),
        _inst("decode-2", used=10, running=1),
        _inst("prefill-0", role=Role.PREFILL),
        where={"r1": "decode-0"},
    )
    _running(actors["actor-decode-0"], "r1")
    entry = asyncio.run(c.migrate("r1"))
    assert entry.destination == "decode-2" and entry.report is not None
    assert entry.report.outcome is MigrationOutcome.MOVED
    ((rid, target, mode),) = actors["actor-decode-0"].calls
    assert (rid, target.instance_id, target.kv_endpoint, mode) == ("r1", "decode-2", "127.0.0.1:8", "live")
    assert c.in_flight() == [] and [e.request_id for e in c.recent()] == ["r1"]
    assert c.counters.counts[("manual", "moved")] == 1 and c.counters.wire_bytes == 100


@pytest.mark.parametrize(
    ("request_id", "to", "message"),
    [
        ("nowhere", "decode-1", "is not decoding anywhere"),
        ("r1", "decode-0", "own worker"),
        ("r1", "prefill-0", "not a decode worker"),
        ("r1", "decode-9", "no instance 'decode-9'"),
        ("r1", "decode-1", "CORDONED"),
    ],
)
def test_impossible_migrations_are_refused_with_a_reason(request_id: str, to: str, message: str) -> None:
    c, actors = _setup(
        _inst("decode-0"), _inst("decode-1"), _inst("prefill-0", role=Role.PREFILL), where={"r1": "decode-0"}
    )
    c.cordon("decode-1")
    with pytest.raises(InvalidRequest, match=message):
        asyncio.run(c.migrate(request_id, to))
    assert actors["actor-decode-0"].calls == []


def test_cordon_and_uncordon_flip_dispatchability() -> None:
    c, _ = _setup(_inst("decode-0"), _inst("decode-1"))
    assert c.cordon("decode-1").state is InstanceState.CORDONED
    assert [i.instance_id for i in c._registry.snapshot(0).live(Role.DECODE)] == ["decode-0"]
    assert c.uncordon("decode-1").state is InstanceState.READY
    with pytest.raises(InvalidRequest):
        c.cordon("decode-7")


def test_drain_cordons_then_moves_everything_and_retries_failures_a_bounded_number_of_times() -> None:
    c, actors = _setup(_inst("decode-0"), _inst("decode-1"), max_concurrent=2)
    source = actors["actor-decode-0"]
    _running(source, "a", "b", "c")
    source.fail.add("c")

    async def go() -> Any:
        draining = asyncio.create_task(c.drain("decode-0", timeout_s=10))
        await _until(lambda: sum(1 for rid, *_ in source.calls if rid == "c") == 3)  # tried three times
        source.running.remove("c")  # then it finished on the source
        source.report()
        return await draining

    result = asyncio.run(go())
    assert c._registry.snapshot(0).by_id("decode-0").state is InstanceState.CORDONED
    assert (result.moved, result.remaining, result.failed) == (2, 0, 3)
    assert all(e.trigger == "drain" for e in result.migrations)
    assert actors["actor-decode-1"].running == ["a", "b"] and source.running == []


def test_drain_moves_no_more_requests_at_once_than_max_concurrent() -> None:
    c, actors = _setup(_inst("decode-0"), _inst("decode-1"), max_concurrent=1)
    _running(actors["actor-decode-0"], "a", "b", "c")
    in_flight: list[int] = []
    original = c.migrate

    async def counting(*args: Any, **kwargs: Any) -> Any:
        in_flight.append(len(c.in_flight()) + 1)
        return await original(*args, **kwargs)

    c.migrate = counting  # type: ignore[method-assign]
    result = asyncio.run(c.drain("decode-0", timeout_s=10))
    assert result.moved == 3 and max(in_flight) == 1


def test_a_request_that_moved_is_not_planned_again_from_its_source_s_stale_report() -> None:
    c, actors = _setup(_inst("decode-0"), _inst("decode-1"), max_concurrent=1)
    source = actors["actor-decode-0"]
    _running(source, "a", "b")
    source.reports = False  # the registry keeps listing both on decode-0 after they moved
    result = asyncio.run(c.drain("decode-0", timeout_s=10))
    assert (result.moved, result.failed) == (2, 0)
    assert sorted(rid for rid, *_ in source.calls) == ["a", "b"]


def test_drain_gives_up_at_its_deadline_and_says_how_many_remain() -> None:
    c, actors = _setup(_inst("decode-0"), _inst("decode-1"))
    _running(actors["actor-decode-0"], "stuck")
    actors["actor-decode-0"].fail.add("stuck")
    result = asyncio.run(c.drain("decode-0", timeout_s=0.5))
    assert result.remaining == 1 and result.moved == 0


async def _until(cond: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def test_migration_metrics_count_by_trigger_and_outcome_with_a_pause_histogram() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from frontdoor.metrics import _migration_metrics

    c, actors = _setup(_inst("decode-0"), _inst("decode-1"), where={"r1": "decode-0", "r2": "decode-0"})
    _running(actors["actor-decode-0"], "r1", "r2")
    actors["actor-decode-0"].fail.add("r2")
    asyncio.run(c.migrate("r1"))
    asyncio.run(c.migrate("r2"))

    class Source:
        def collect(self) -> Any:
            return _migration_metrics(c.counters.totals())

    registry = CollectorRegistry()
    registry.register(Source())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert 'pdflow_migrations_total{outcome="moved",trigger="manual"} 1.0' in text
    assert 'pdflow_migrations_total{outcome="failed",trigger="manual"} 1.0' in text
    assert "pdflow_migration_bytes_total 100.0" in text
    assert 'pdflow_migration_pause_seconds_bucket{le="0.05"} 1.0' in text  # the fake pauses 0 s
    assert "pdflow_migration_pause_seconds_count 1.0" in text


def test_policy_moves_requests_from_a_crowded_decode_worker_to_an_idle_one() -> None:
    crowded = replace(
        _inst("decode-0", used=60, running=6),
        requests=tuple(RunningKV(RequestId(f"r{i}"), kv_blocks=10 - i) for i in range(6)),
    )
    c, actors = _setup(
        crowded, _inst("decode-1"), _inst("prefill-0", role=Role.PREFILL), trigger_gap=8.0, cooldown_s=0.0
    )
    actors["actor-decode-0"].running.extend(f"r{i}" for i in range(6))

    async def one_round() -> list[Any]:
        tasks = c._plan_once()
        return [await t for t in tasks]

    entries = asyncio.run(one_round())
    # max_concurrent moves, least KV to copy first, while the freeness gap stays above the trigger
    assert [e.request_id for e in entries] == ["r5", "r4"]
    assert {(e.destination, e.trigger) for e in entries} == {("decode-1", "load_balance")}
    assert c.counters.counts[("load_balance", "moved")] == 2


def test_policy_leaves_a_balanced_cluster_alone() -> None:
    a = replace(
        _inst("decode-0", used=20, running=2),
        requests=(RunningKV(RequestId("a"), 10), RunningKV(RequestId("b"), 10)),
    )
    b = replace(
        _inst("decode-1", used=20, running=2),
        requests=(RunningKV(RequestId("c"), 10), RunningKV(RequestId("d"), 10)),
    )
    c, _ = _setup(a, b, cooldown_s=0.0)

    async def one_round() -> int:
        return len(c._plan_once())

    assert asyncio.run(one_round()) == 0


def test_a_policy_move_that_failed_frees_its_place_for_the_next_round() -> None:
    """The policy counts its planned moves against ``max_concurrent`` until they end, moved or not: a failed
    one must not hold its place for good."""
    crowded = replace(
        _inst("decode-0", used=60, running=6),
        requests=tuple(RunningKV(RequestId(f"r{i}"), kv_blocks=10) for i in range(6)),
    )
    c, actors = _setup(crowded, _inst("decode-1"), trigger_gap=8.0, cooldown_s=0.0, max_concurrent=1)
    actors["actor-decode-0"].running.extend(f"r{i}" for i in range(6))
    actors["actor-decode-0"].fail.update(f"r{i}" for i in range(6))

    async def two_rounds() -> list[int]:
        planned = []
        for _ in range(2):
            tasks = c._plan_once()
            planned.append(len(tasks))
            await asyncio.gather(*tasks)
        return planned

    assert asyncio.run(two_rounds()) == [1, 1]
