"""The autoscaler loop on a ``FakeCluster``: an actuator that adds and removes the cluster's in-process
workers (a new one is on its way until its engine starts), and the front doors as the cluster's one router."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from controller.autoscaling import AutoscalerLoop
from protocol.actuation import Actuation, Outcome, PoolMembers
from protocol.errors import InvalidRequest
from protocol.snapshots import Role
from tests.support.fake_cluster import FakeCluster


class FakeActuator:
    """Switches roles in place where the cluster's workers can (``FakeCluster(switchable=True)``)."""

    kind = "fake"

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster
        self.switches_in_place = cluster.switchable
        self.switched: list[tuple[str, Role]] = []
        self.refuse_switch = False
        self.ghosts: set[str] = set()  # instances on their way that never serve (an engine that hangs)
        self.reports: list[asyncio.Task[Any]] = []
        self.starting: dict[str, asyncio.Task[Any]] = {}
        self.calls: list[tuple[str, Role, int, tuple[str, ...], tuple[str, ...]]] = []
        self.removed: list[str] = []
        self.stopping: list[asyncio.Task[Any]] = []
        self._applied: set[str] = set()
        self._next = itertools.count(100)
        self.highest_only = False
        self.departed: set[str] = set()  # workers whose pod was deleted by someone else (a rolling update)

    def members(self, role: Role) -> PoolMembers:
        running = {n.removeprefix("pdflow-") for n, w in self.cluster.workers.items() if w.role is role}
        coming = {i for i in (*self.starting, *self.ghosts) if i.startswith(f"{role.value}-")}
        ids = sorted((running | coming) - self.departed)
        pending = tuple(
            i for i in ids if i in self.ghosts or (i in self.starting and not self.starting[i].done())
        )
        return PoolMembers(len(ids), tuple(ids), pending)

    def victim_order(self, role: Role, candidates: list[str]) -> list[str]:
        if self.highest_only:  # as a StatefulSet: only its highest ordinal can go
            return sorted(candidates, key=lambda i: int(i.rsplit("-", 1)[1]))[-1:]
        return list(candidates)

    def resume(self, role: Role) -> PoolMembers:
        return self.members(role)

    def scale(
        self,
        decision_id: str,
        role: Role,
        replicas: int,
        *,
        victims: tuple[str, ...] = (),
        cancel: tuple[str, ...] = (),
    ) -> Actuation:
        self.calls.append((decision_id, role, replicas, victims, cancel))
        before = self.members(role).replicas
        if decision_id in self._applied or replicas == before:
            return Actuation(decision_id, role, Outcome.UNCHANGED, before, before)
        self._applied.add(decision_id)
        if replicas > before:
            for _ in range(replicas - before):
                index = next(self._next)
                task = asyncio.ensure_future(self.cluster.add_worker(role, index))
                self.starting[f"{role.value}-{index}"] = task
                task.add_done_callback(lambda _, i=f"{role.value}-{index}": self.starting.pop(i, None))
            return Actuation(decision_id, role, Outcome.APPLIED, before, replicas)
        leaving = cancel or victims
        for iid in leaving:
            worker = self.cluster.workers.pop(f"pdflow-{iid}", None)
            if worker is not None:  # gone from the cluster at once: a request sent there now fails
                self.stopping.append(asyncio.ensure_future(worker.shutdown()))
            task = self.starting.pop(iid, None)
            if task is not None:
                task.cancel()
            self.removed.append(iid)
        return Actuation(decision_id, role, Outcome.APPLIED, before, replicas, tuple(leaving))

    def switch(self, decision_id: str, instance_id: str, role: Role) -> Actuation:
        before = self.members(role).replicas
        if not self.switches_in_place:
            return Actuation(decision_id, role, Outcome.REFUSED, before, before)
        worker = self.cluster.worker(instance_id)
        try:
            if self.refuse_switch:  # as a worker that does not answer
                raise TimeoutError(f"{instance_id} did not answer")
            worker.take_role(role.value)
        except (InvalidRequest, TimeoutError) as exc:
            return Actuation(decision_id, role, Outcome.FAILED, before, before, detail=str(exc))
        self.reports.append(asyncio.ensure_future(worker.switch_role(role.value)))  # as the Ray worker does
        self.switched.append((instance_id, role))
        return Actuation(decision_id, role, Outcome.APPLIED, before, before + 1)


class FakeFrontDoors:
    def __init__(self, cluster: FakeCluster, *, blind: bool = False) -> None:
        """``blind``: report nothing on its way to any instance (the control case). ``stuck``: report one
        request on its way to every instance, for ever (a drain cannot finish)."""
        self.cluster = cluster
        self.blind = blind
        self.stuck = False
        self.most_inbound: dict[str, int] = {}

    async def publish(self) -> None:
        self.cluster.router.update_snapshot(self.cluster.registry.snapshot(self.cluster.wall_clock()))

    async def inbound(self, instance_id: str) -> int:
        count = self.cluster.router.inbound(instance_id)
        self.most_inbound[instance_id] = max(count, self.most_inbound.get(instance_id, 0))
        return 1 if self.stuck else 0 if self.blind else count


async def _direct(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def autoscaler(
    cluster: FakeCluster, *, blind: bool = False, enabled: bool = True
) -> tuple[AutoscalerLoop, FakeActuator, FakeFrontDoors]:
    cluster.config.autoscaler.enabled = enabled
    actuator, doors = FakeActuator(cluster), FakeFrontDoors(cluster, blind=blind)
    loop = AutoscalerLoop(
        cluster.config,
        cluster.registry,
        cluster.requests,
        cluster.coordinator,
        actuator,
        doors,
        clock=cluster.clock,
        wall_clock=cluster.wall_clock,
        offload=_direct,
    )
    return loop, actuator, doors
