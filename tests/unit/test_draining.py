"""Emptying one worker before it leaves (``controller.draining``), as ``pdctl drain``, the preStop hook of a
Kubernetes pod and the autoscaler's scale-in do it: the front doors hear of the cordon before anything
waits, a prefill worker is empty once nothing is on its way to it and it reports no load, and a decode
worker's running and inbound requests go to the migration coordinator."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from controller.draining import drain_instance
from controller.migrations import DrainResult
from controller.registry import InstanceRegistry
from protocol.ids import InstanceId
from protocol.snapshots import InstanceSnapshot, InstanceState, Role


def snap(iid: str, role: Role, in_flight: int = 0) -> InstanceSnapshot:
    return InstanceSnapshot(InstanceId(iid), role, InstanceState.READY, f"pdflow-{iid}", in_flight=in_flight)


class Doors:
    """Front doors that have ``coming`` requests on their way to the instance, one fewer at each question."""

    def __init__(self, registry: InstanceRegistry, coming: int, *, stuck: bool = False) -> None:
        self.registry, self.coming, self.stuck = registry, coming, stuck
        self.events: list[str] = []

    async def publish(self) -> None:
        cordoned = self.registry.snapshot(0.0).by_id("prefill-0")
        self.events.append(f"publish {cordoned.state.value if cordoned else '-'}")

    async def inbound(self, instance_id: str) -> int:
        self.events.append("inbound")
        if self.coming and not self.stuck:
            self.coming -= 1
            return self.coming + 1
        return self.coming


class Migrations:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, int]] = []

    async def drain(self, iid: str, timeout_s: float, inbound: Any) -> DrainResult:
        self.calls.append((iid, timeout_s, await inbound()))
        return DrainResult(moved=3, seconds=0.1)


async def _reporting(registry: InstanceRegistry, iid: str, role: Role, load: int) -> None:
    while True:  # the worker's timer
        registry.report(snap(iid, role, in_flight=load), time.monotonic())
        await asyncio.sleep(0.05)


async def test_a_prefill_worker_is_empty_once_nothing_comes_and_it_reports_no_load() -> None:
    registry = InstanceRegistry(heartbeat_timeout_s=3.0)
    registry.report(snap("prefill-0", Role.PREFILL, in_flight=2), time.monotonic())
    doors = Doors(registry, coming=2)
    reports = asyncio.create_task(_reporting(registry, "prefill-0", Role.PREFILL, load=0))
    try:
        result = await drain_instance(
            "prefill-0", Role.PREFILL, registry=registry, migrations=Migrations(),  # type: ignore[arg-type]
            frontdoors=doors, timeout_s=10.0, clock=time.monotonic,
        )  # fmt: skip
    finally:
        reports.cancel()
    assert result.remaining == 0
    assert doors.events[0] == "publish CORDONED"  # the front doors know before the drain waits on them
    assert doors.events.count("inbound") >= 3  # it waited for both requests on their way
    assert registry.snapshot(0.0).by_id("prefill-0").state is InstanceState.CORDONED  # type: ignore[union-attr]


async def test_a_prefill_worker_still_needed_when_the_time_is_up_is_not_empty() -> None:
    registry = InstanceRegistry(heartbeat_timeout_s=3.0)
    registry.report(snap("prefill-0", Role.PREFILL), time.monotonic())
    doors = Doors(registry, coming=1, stuck=True)
    result = await drain_instance(
        "prefill-0", Role.PREFILL, registry=registry, migrations=Migrations(),  # type: ignore[arg-type]
        frontdoors=doors, timeout_s=0.5, clock=time.monotonic,
    )  # fmt: skip
    assert result.remaining == 1 and result.seconds >= 0.5


async def test_a_dead_worker_is_not_waited_for() -> None:
    """A pod stopped because its engine died (a liveness kill runs the preStop hook too) has nothing to
    drain: the hook returns at once instead of holding the restart for the drain's whole deadline."""
    from dataclasses import replace

    registry = InstanceRegistry(heartbeat_timeout_s=3.0)
    registry.report(replace(snap("prefill-0", Role.PREFILL), state=InstanceState.DEAD), time.monotonic())
    doors = Doors(registry, coming=1, stuck=True)
    started = time.monotonic()
    result = await drain_instance(
        "prefill-0", Role.PREFILL, registry=registry, migrations=Migrations(),  # type: ignore[arg-type]
        frontdoors=doors, timeout_s=30.0, clock=time.monotonic,
    )  # fmt: skip
    assert result.remaining == 0 and time.monotonic() - started < 1.0
    assert doors.events == []  # nothing cordoned, nobody told


async def test_a_decode_worker_is_drained_by_the_migration_coordinator_with_what_is_inbound() -> None:
    registry = InstanceRegistry(heartbeat_timeout_s=3.0)
    registry.report(snap("decode-0", Role.DECODE), time.monotonic())
    doors, migrations = Doors(registry, coming=1), Migrations()
    result = await drain_instance(
        "decode-0", Role.DECODE, registry=registry, migrations=migrations,  # type: ignore[arg-type]
        frontdoors=doors, timeout_s=42.0, clock=time.monotonic,
    )  # fmt: skip
    assert result.moved == 3
    assert migrations.calls == [("decode-0", 42.0, 1)]  # its inbound count reaches the coordinator
    assert registry.snapshot(0.0).by_id("decode-0").state is InstanceState.CORDONED  # type: ignore[union-attr]
