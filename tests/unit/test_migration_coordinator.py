"""The controller's migration coordination against fake worker actors: destination choice, refusals with
clear errors, the record of what ran, and drain (cordon, then move until empty)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from controller.migrations import MigrationCoordinator
from controller.registry import InstanceRegistry
from protocol.config import MigrationConfig, MigrationMode
from protocol.errors import InvalidRequest
from protocol.ids import InstanceId
from protocol.migrations import MigrationOutcome, MigrationReport, MigrationTarget
from protocol.snapshots import InstanceSnapshot, InstanceState, Role


class _Remote:
    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def remote(self, *args: Any) -> Any:
        return self._fn(*args)


@dataclass
class FakeDecodeActor:
    """A decode worker's Ray handle: ``migrate`` moves a request away unless told to fail it."""

    instance_id: str
    running: list[str] = field(default_factory=list)
    fail: set[str] = field(default_factory=set)
    calls: list[tuple[str, MigrationTarget, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.migrate = _Remote(self._migrate)
        self.running_requests = _Remote(self._running)

    async def _migrate(self, rid: str, mid: str, target: MigrationTarget, mode: str) -> MigrationReport:
        self.calls.append((rid, target, mode))
        outcome = MigrationOutcome.FAILED if rid in self.fail else MigrationOutcome.MOVED
        if outcome is MigrationOutcome.MOVED:
            self.running.remove(rid)
        return MigrationReport(
            rid, mid, self.instance_id, target.instance_id, MigrationMode(mode), outcome, wire_bytes=100
        )

    async def _running(self) -> list[str]:
        return list(self.running)


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


def _setup(*instances: InstanceSnapshot, where: dict[str, str] | None = None) -> tuple[Any, dict[str, Any]]:
    registry = InstanceRegistry(heartbeat_timeout_s=60)
    for inst in instances:
        registry.report(inst, time.monotonic())
    actors = {f"actor-{i.instance_id}": FakeDecodeActor(i.instance_id) for i in instances}
    coordinator = MigrationCoordinator(registry, MigrationConfig(), actors.__getitem__, (where or {}).get)
    return coordinator, actors


def test_manual_migration_goes_to_the_freest_other_decode_worker_and_is_recorded() -> None:
    c, actors = _setup(
        _inst("decode-0", used=90, running=9),
        _inst("decode-1", used=50, running=5),
        _inst("decode-2", used=10, running=1),
        _inst("prefill-0", role=Role.PREFILL),
        where={"r1": "decode-0"},
    )
    actors["actor-decode-0"].running.append("r1")
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
    c, actors = _setup(_inst("decode-0"), _inst("decode-1"))
    source = actors["actor-decode-0"]
    source.running.extend(["a", "b", "c"])
    source.fail.add("c")

    async def finish_c_later() -> None:
        await asyncio.sleep(1.0)
        source.running.remove("c")  # it finished on the source after failing to move

    async def go() -> Any:
        later = asyncio.create_task(finish_c_later())
        result = await c.drain("decode-0", timeout_s=10)
        await later
        return result

    result = asyncio.run(go())
    assert c._registry.snapshot(0).by_id("decode-0").state is InstanceState.CORDONED
    assert (result.moved, result.remaining) == (2, 0)
    assert 1 <= result.failed <= 3  # "c" was tried, at most three times
    assert all(e.trigger == "drain" for e in result.migrations)
    assert actors["actor-decode-1"].calls == [] and source.running == []


def test_drain_gives_up_at_its_deadline_and_says_how_many_remain() -> None:
    c, actors = _setup(_inst("decode-0"), _inst("decode-1"))
    actors["actor-decode-0"].running.append("stuck")
    actors["actor-decode-0"].fail.add("stuck")
    result = asyncio.run(c.drain("decode-0", timeout_s=0.5))
    assert result.remaining == 1 and result.moved == 0


def test_migration_metrics_count_by_trigger_and_outcome_with_a_pause_histogram() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from controller.metrics import _migration_metrics

    c, actors = _setup(_inst("decode-0"), _inst("decode-1"), where={"r1": "decode-0", "r2": "decode-0"})
    actors["actor-decode-0"].running.extend(["r1", "r2"])
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
    from dataclasses import replace

    from controller.policy.migration import MigrationPolicyConfig
    from protocol.snapshots import RunningKV

    crowded = replace(
        _inst("decode-0", used=60, running=6),
        requests=tuple(RunningKV(f"r{i}", kv_blocks=10 - i) for i in range(6)),  # type: ignore[arg-type]
    )
    c, actors = _setup(crowded, _inst("decode-1"), _inst("prefill-0", role=Role.PREFILL))
    actors["actor-decode-0"].running.extend(f"r{i}" for i in range(6))

    async def one_round() -> list[Any]:
        tasks = c._plan_once(MigrationPolicyConfig(trigger_gap=8.0, max_concurrent=2, cooldown_s=0.0))
        return [await t for t in tasks]

    entries = asyncio.run(one_round())
    # max_concurrent moves, least KV to copy first, while the freeness gap stays above the trigger
    assert [e.request_id for e in entries] == ["r5", "r4"]
    assert {(e.destination, e.trigger) for e in entries} == {("decode-1", "load_balance")}
    assert c.counters.counts[("load_balance", "moved")] == 2


def test_policy_leaves_a_balanced_cluster_alone() -> None:
    from dataclasses import replace

    from controller.policy.migration import MigrationPolicyConfig
    from protocol.snapshots import RunningKV

    a = replace(_inst("decode-0", used=20, running=2), requests=(RunningKV("a", 10), RunningKV("b", 10)))  # type: ignore[arg-type]
    b = replace(_inst("decode-1", used=20, running=2), requests=(RunningKV("c", 10), RunningKV("d", 10)))  # type: ignore[arg-type]
    c, _ = _setup(a, b)

    async def one_round() -> int:
        return len(c._plan_once(MigrationPolicyConfig(cooldown_s=0.0)))

    assert asyncio.run(one_round()) == 0
