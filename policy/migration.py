"""Migration: which running request moves from which decode instance to which, and why. Pure: the controller,
the tests and the simulator call the same ``decide``; an actuator carries out the plan and reports back.

Load metric (Llumnix ``policy.freeness``): ``(total blocks - virtual usage) / max(batch, 1)``, ``batch``
being the running requests. Virtual usage is the used blocks, plus the head-of-line waiting request's demand
(de-fragmentation), plus a headroom per high-priority request; a draining instance has infinite usage, so
freeness -inf. A cordoned instance takes no new request, migrations included, but keeps the ones it runs
unless it is also draining (``pdctl drain``, a scale-in).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from policy.freeness import freeness, instance_freeness
from protocol.config import MigrationConfig, RequestChoice
from protocol.errors import InvalidRequest
from protocol.ids import InstanceId, RequestId
from protocol.snapshots import ClusterSnapshot, InstanceSnapshot, InstanceState, Role


class MigrationTrigger(enum.StrEnum):
    LOAD_BALANCE = "load_balance"
    DEFRAG = "defrag"
    PRIORITY = "priority"
    DRAIN = "drain"
    MANUAL = "manual"  # an operator's pdctl migrate; the policy never plans one


@dataclass(frozen=True, slots=True)
class RunningRequest:
    """A request decoding on ``instance_id``. ``priority``: higher is more important, > 0 earns headroom."""

    request_id: RequestId
    instance_id: InstanceId
    priority: int = 0
    kv_blocks: int = 0  # blocks it holds now
    blocks_to_copy: int = 0  # blocks a migration would have to move


@dataclass(frozen=True, slots=True)
class MigrationIntent:
    request_id: RequestId
    source: InstanceId
    destination: InstanceId
    trigger: MigrationTrigger
    reason: str


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    intents: tuple[MigrationIntent, ...] = ()


@dataclass(frozen=True, slots=True)
class InFlightMigration:
    request_id: RequestId
    source: InstanceId
    destination: InstanceId
    started_at: float


@dataclass(frozen=True, slots=True)
class MigrationState:
    """What the policy remembers between calls; the caller keeps it. ``decide`` drops an in-flight entry once
    its request has finished or runs on the destination; the actuator calls ``finished`` on an abort."""

    in_flight: tuple[InFlightMigration, ...] = ()
    last_migration: tuple[tuple[InstanceId, float], ...] = ()  # (instance, when it last took part)

    def finished(self, request_id: RequestId) -> MigrationState:
        """This state without the request's in-flight migration (committed or aborted)."""
        return replace(self, in_flight=tuple(m for m in self.in_flight if m.request_id != request_id))


@dataclass(frozen=True, slots=True)
class _Load:
    """One decode instance as the policy models it; ``shed``/``take`` give the model after a move."""

    total: int
    used: int
    batch: int
    high_priority: int
    hol_blocks: int  # head-of-line demand, 0 when nothing waits
    headroom_blocks: int
    draining: bool
    receives: bool  # may be a destination (READY, not cordoned)
    waiting: int = 0
    max_batch: int | None = None  # None: no batch limit known

    @property
    def freeness(self) -> float:
        if self.draining:
            return -math.inf
        virtual = self.used + self.hol_blocks + self.high_priority * self.headroom_blocks
        return freeness(self.total - virtual, self.batch)

    @property
    def plain_freeness(self) -> float:
        """Freeness from used blocks alone: tells a load imbalance from a defrag or priority one."""
        return freeness(self.total - self.used, self.batch)

    def fits(self, r: RunningRequest) -> bool:
        """Room for ``r``: its KV blocks, and a place in the batch (a request moved into a full batch would
        only wait there)."""
        full = self.max_batch is not None and self.batch + self.waiting >= self.max_batch
        return not full and self.total - self.used >= r.kv_blocks

    def shed(self, r: RunningRequest) -> _Load:
        hp = self.high_priority - (r.priority > 0)
        return replace(self, used=self.used - r.kv_blocks, batch=self.batch - 1, high_priority=hp)

    def take(self, r: RunningRequest) -> _Load:
        hp = self.high_priority + (r.priority > 0)
        return replace(self, used=self.used + r.kv_blocks, batch=self.batch + 1, high_priority=hp)


def _load(
    instance: InstanceSnapshot,
    requests: Sequence[RunningRequest],
    config: MigrationConfig,
    draining: bool = False,
) -> _Load:
    # The waiting queue's head is not visible in the snapshot; approximate its demand by the largest running
    # request in the cluster (a waiting request may well be that big), counted only when something waits.
    largest = max((r.kv_blocks for r in requests), default=0)
    mine = [r for r in requests if r.instance_id == instance.instance_id]
    return _Load(
        total=instance.kv_blocks_total,
        used=instance.kv_blocks_used,
        batch=instance.num_running,
        high_priority=sum(1 for r in mine if r.priority > 0),
        hol_blocks=largest if instance.num_waiting > 0 else 0,
        headroom_blocks=config.headroom_blocks,
        draining=draining,
        receives=instance.state is InstanceState.READY and not draining,
        waiting=instance.num_waiting,
        max_batch=instance.max_batch,
    )


def virtual_freeness(
    instance: InstanceSnapshot, requests: Sequence[RunningRequest], config: MigrationConfig
) -> float:
    """Llumnix freeness of one decode instance by its virtual usage (head-of-line demand and priority
    headroom counted as taken); ``requests`` are the cluster's running requests."""
    return _load(instance, requests, config).freeness


def _preference(choice: RequestChoice) -> Callable[[RunningRequest], tuple[int | str, ...]]:
    if choice is RequestChoice.MOST_KV:
        return lambda r: (-r.kv_blocks, r.request_id)
    if choice is RequestChoice.LOWEST_PRIORITY:
        return lambda r: (r.priority, r.blocks_to_copy, r.request_id)
    return lambda r: (r.blocks_to_copy, r.request_id)


def _shrinks(src: _Load, dst: _Load, r: RunningRequest) -> bool:
    """The move fits, strictly narrows the pair's spread and creates no new extreme (so no cluster-wide
    spread grows and a request never ping-pongs back)."""
    if not dst.fits(r):
        return False
    lo, hi = src.freeness, dst.freeness
    a, b = src.shed(r).freeness, dst.take(r).freeness
    return max(a, b) - min(a, b) < hi - lo and min(a, b) >= lo and max(a, b) <= hi


def decide(
    snapshot: ClusterSnapshot,
    requests: Sequence[RunningRequest],
    state: MigrationState,
    config: MigrationConfig,
    now: float,
    draining: frozenset[InstanceId] = frozenset(),
) -> tuple[MigrationPlan, MigrationState]:
    """Plan migrations; ``now`` is on the clock the returned state's times use. Never mutates its inputs.

    Decode instances that are READY may send and receive; CORDONED ones may send but never receive; those in
    ``draining`` are emptied (every running request moves away, trigger DRAIN, ignoring cooldowns); STARTING
    and DEAD ones are left out. Then, repeatedly, the lowest-freeness instance sends to the highest-freeness
    one that receives, neither in cooldown, while their gap exceeds ``trigger_gap`` and a request exists whose
    move shrinks it (the first in ``config.request_choice`` order that does). At most ``max_concurrent``
    migrations are in flight, planned included; a request already migrating is never planned again.
    """
    where = {r.request_id: r.instance_id for r in requests}
    in_flight = [m for m in state.in_flight if where.get(m.request_id) == m.source]
    busy = {m.request_id for m in in_flight}
    last = dict(state.last_migration)
    loads = {
        i.instance_id: _load(i, requests, config, i.instance_id in draining)
        for i in snapshot.instances
        if i.role is Role.DECODE and i.state in (InstanceState.READY, InstanceState.CORDONED)
    }
    order = sorted(
        (r for r in requests if r.instance_id in loads and r.request_id not in busy),
        key=_preference(config.request_choice),
    )
    intents: list[MigrationIntent] = []

    def plan(r: RunningRequest, dst: InstanceId, trigger: MigrationTrigger, reason: str) -> None:
        src = r.instance_id
        loads[src], loads[dst] = loads[src].shed(r), loads[dst].take(r)
        intents.append(MigrationIntent(r.request_id, src, dst, trigger, reason))
        in_flight.append(InFlightMigration(r.request_id, src, dst, now))
        busy.add(r.request_id)
        last[src] = last[dst] = now

    for r in order:
        if len(in_flight) >= config.max_concurrent:
            break
        if not loads[r.instance_id].draining:
            continue
        targets = [(load.freeness, iid) for iid, load in loads.items() if load.receives and load.fits(r)]
        if targets:
            dst = max(targets)[1]
            plan(r, dst, MigrationTrigger.DRAIN, f"{r.instance_id} is draining")

    def cooling(iid: InstanceId) -> bool:
        return now - last.get(iid, -math.inf) < config.cooldown_s

    while len(in_flight) < config.max_concurrent:
        ready = sorted(
            (load.freeness, iid) for iid, load in loads.items() if not load.draining and not cooling(iid)
        )
        receivers = [(f, iid) for f, iid in ready if loads[iid].receives]
        if len(ready) < 2 or not receivers:
            break
        (low, src), (high, dst) = ready[0], receivers[-1]
        if src == dst or high - low <= config.trigger_gap:
            break
        pick = next(
            (
                r
                for r in order
                if r.instance_id == src and r.request_id not in busy and _shrinks(loads[src], loads[dst], r)
            ),
            None,
        )
        if pick is None:
            break
        if loads[dst].plain_freeness - loads[src].plain_freeness > config.trigger_gap:
            trigger = MigrationTrigger.LOAD_BALANCE
        elif loads[src].hol_blocks:
            trigger = MigrationTrigger.DEFRAG
        else:
            trigger = MigrationTrigger.PRIORITY
        plan(
            pick,
            dst,
            trigger,
            f"freeness {low:.1f} on {src} vs {high:.1f} on {dst} > gap {config.trigger_gap}",
        )

    new_state = MigrationState(in_flight=tuple(in_flight), last_migration=tuple(sorted(last.items())))
    return MigrationPlan(tuple(intents)), new_state


def choose_destination(snapshot: ClusterSnapshot, source: str) -> InstanceSnapshot:
    """Where a migration from ``source`` goes when nobody named a destination: the READY decode worker with a
    KV endpoint, other than ``source``, with the highest freeness once it holds the request. Raises
    ``InvalidRequest`` when there is none."""
    candidates = [i for i in snapshot.live(Role.DECODE) if i.instance_id != source and i.kv_endpoint]
    if not candidates:
        raise InvalidRequest(f"no other READY decode worker to migrate to from {source}")
    return max(candidates, key=lambda i: (instance_freeness(i, extra_requests=1), i.instance_id))
