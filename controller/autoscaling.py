"""The autoscaler loop in the controller: every ``autoscaler.interval_s`` it observes the cluster (the
registry, the request log's latencies, the actuator's view of the pools), runs the pure policy
(``policy.scaling.step``) and carries its decision out through the actuator it was given (Ray actors or a
Kubernetes workload: ``protocol.actuation.Actuator``), one decision at a time.

A scale-in loses nothing: the victim is cordoned, every front door is sent the snapshot that says so (and
answers), then it is drained: its running requests move by live migration (recompute as the last resort),
and the requests still on their way to it (prefilling for it, being handed over) are waited for and moved
once they land. A prefill victim is drained by waiting for its prompts and their hand-offs. The drained
instance stays warm (``warm_s``), is put back at once if an SLO regresses, and only then is removed. This
loop keeps that lifecycle (``protocol.instances``) for the instances it takes out; the registry's cordon
keeps them out of dispatch.

An operator can pause it, resume it, or set a manual target (which pauses the policy); a pool someone else
sized (``manual_override``) holds the loop until an operator resumes it."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from controller.migrations import DrainResult, MigrationCoordinator
from controller.registry import InstanceRegistry
from controller.request_log import RequestLog
from policy.scaling import (
    InstanceView,
    ScaleDecision,
    ScaleObservation,
    ScaleReason,
    ScaleState,
    step,
    within_budget,
)
from protocol.actuation import Actuation, Actuator, Outcome, PoolMembers
from protocol.config import ClusterConfig
from protocol.errors import InvalidRequest
from protocol.instances import InstanceState, advance
from protocol.lifecycle import RequestState
from protocol.snapshots import AutoscalerTotals, InstanceSnapshot, Role

log = logging.getLogger(__name__)
_ROLES = (Role.PREFILL, Role.DECODE)
_HISTORY = 200
_SETTLE_POLL_S = 0.2


class FrontDoors(Protocol):
    async def publish(self) -> None:
        """Send every front door the current snapshot and wait until each has it (within a deadline)."""
        ...

    async def inbound(self, instance_id: str) -> int:
        """Requests the front doors have planned on ``instance_id`` that still need it (see
        ``RequestRouter.inbound``)."""
        ...


@dataclass
class _Leaving:
    """An instance this loop is taking out of service (or switching role)."""

    role: Role
    state: InstanceState
    since: float
    flip_to: Role | None = None


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """A decision, when it was made, and what carrying it out did."""

    decision: ScaleDecision
    at: float  # unix seconds
    actions: tuple[str, ...] = ()
    manual: bool = False


@dataclass
class AutoscalerStatus:
    enabled: bool
    actuator: str
    paused: str  # why the policy is not acting ("" when it is)
    manual_target: tuple[int, int] | None
    desired: dict[Role, int] = field(default_factory=dict)
    ready: dict[Role, int] = field(default_factory=dict)
    pending: dict[Role, int] = field(default_factory=dict)
    draining: dict[Role, int] = field(default_factory=dict)  # cordoned, draining, drained or warm
    decode_tps: float = 0.0
    prefill_miss_tps: float = 0.0
    decisions: dict[str, int] = field(default_factory=dict)  # by reason
    last: DecisionRecord | None = None


class AutoscalerLoop:
    def __init__(
        self,
        config: ClusterConfig,
        registry: InstanceRegistry,
        requests: RequestLog,
        migrations: MigrationCoordinator,
        actuator: Actuator,
        frontdoors: FrontDoors,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        offload: Callable[..., Awaitable[object]] | None = None,
    ) -> None:
        """``clock`` is the registry's (ticks, warm windows); ``wall_clock`` that of the request events.
        ``offload`` runs a blocking actuator call off the event loop (``asyncio.to_thread`` by default)."""
        self.config = config.autoscaler
        self._cluster = config
        self._registry = registry
        self._requests = requests
        self._migrations = migrations
        self._actuator = actuator
        self._frontdoors = frontdoors
        self._clock = clock
        self._wall_clock = wall_clock
        self._offload = offload or asyncio.to_thread
        self.state = ScaleState()
        self.paused = ""
        self.hold = ""  # a pool someone else sized (the actuator's word), until an operator resumes
        self.manual_target: tuple[int, int] | None = None
        self._leaving: dict[str, _Leaving] = {}
        self._first_seen: dict[str, float] = {}
        self.history: collections.deque[DecisionRecord] = collections.deque(maxlen=_HISTORY)
        self.counts: collections.Counter[str] = collections.Counter()
        self._ids = itertools.count(1)
        self._busy: asyncio.Task[None] | None = None
        self._last_members: dict[Role, PoolMembers] = {}  # the actuator's view at the last tick

    # ---- the loop ----

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.tick()
            except Exception:  # one bad round must not stop the autoscaler
                log.exception("autoscaler round failed")

    async def tick(self) -> DecisionRecord | None:
        """One round: observe, decide (unless paused or a decision is still being carried out), and start
        carrying the decision out. Returns the decision, if one was made."""
        members = {role: await self._members(role) for role in _ROLES}
        idle = self._busy is None or self._busy.done()
        if idle and await self._remove_dead(members):
            members = {role: await self._members(role) for role in _ROLES}
        obs = self.observe(members)
        self._last_members = members
        self.hold = "; ".join(m.hold for m in members.values() if m.hold)
        if self._busy is not None and not self._busy.done():
            return None
        if self.paused or self.hold:
            return None
        decision, self.state = step(obs, self.state, self._clock(), self.config)
        decision = replace(decision, decision_id=next(self._ids))
        record = DecisionRecord(decision, self._wall_clock())
        self.counts[decision.reason.value] += 1
        if self._acts(decision):
            log.info(
                "autoscaler decision %d: %s (%s)", decision.decision_id, decision.reason, decision.detail
            )
            self._busy = asyncio.create_task(self._carry_out(record, members))
        else:
            self.history.append(record)
        return record

    async def _remove_dead(self, members: dict[Role, PoolMembers]) -> bool:
        """Instances the actuator still runs whose worker is DEAD are removed, so that the policy's scale-out
        replaces them: at once if the worker said so (its engine failed), after three heartbeat timeouts of
        silence otherwise (a starved worker may be late, not dead)."""
        snapshot = self._registry.snapshot(self._wall_clock())
        timeout = self._cluster.controller.heartbeat_timeout_s
        removed = False
        for role, pool in members.items():
            for iid in pool.instances:
                inst = snapshot.by_id(iid)
                if inst is None or inst.state is not InstanceState.DEAD or iid in self._leaving:
                    continue
                silent = self._registry.seconds_since_report(iid, self._clock())
                if timeout <= silent <= 3 * timeout:
                    continue
                action = await self._scale(f"dead-{iid}-{int(self._wall_clock())}", role, -1, victims=(iid,))
                log.warning("%s is DEAD: %s", iid, action)
                self.counts["removed_dead"] += 1
                removed = True
        return removed

    async def settle(self, timeout_s: float) -> None:
        """Wait until the decision being carried out is done (tests, shutdown)."""
        if self._busy is not None:
            await asyncio.wait_for(asyncio.shield(self._busy), timeout_s)

    def observe(self, members: dict[Role, PoolMembers], *, latencies: bool = True) -> ScaleObservation:
        """The policy's inputs: every instance (the registry's, the ones the actuator has on their way, and
        this loop's view of those it is taking out), the decode and cache-miss prompt tokens/s, and the
        p99 latencies of the requests that finished within the latency window."""
        now = self._clock()
        snapshot = self._registry.snapshot(self._wall_clock())
        views: list[InstanceView] = []
        known = set()
        decode_tps = prefill_tps = 0.0
        for inst in snapshot.instances:
            known.add(inst.instance_id)
            if inst.state is InstanceState.DEAD:
                continue
            if inst.role is Role.DECODE:
                decode_tps += inst.decode_tps
            else:
                prefill_tps += inst.prompt_tps
            leaving = self._leaving.get(inst.instance_id)
            state = leaving.state if leaving is not None else inst.state
            if leaving is None and inst.state is InstanceState.CORDONED:
                continue  # an operator's cordon: neither supply nor the autoscaler's to touch
            since = (
                leaving.since if leaving is not None else self._first_seen.setdefault(inst.instance_id, now)
            )
            views.append(_view(inst, state, since))
        for role, pool in members.items():
            for iid in pool.instances:
                if iid in known or iid in self._leaving:
                    continue
                self._registry.admit(iid)  # a new instance may reuse the id of one removed before
                state = InstanceState.PENDING if iid in pool.pending else InstanceState.STARTING
                views.append(InstanceView(iid, role, state, since=self._first_seen.setdefault(iid, now)))
        ttft, tpot = self._latencies() if latencies else (None, None)
        return ScaleObservation(decode_tps, prefill_tps, ttft, tpot, tuple(views))

    # ---- the operator's controls ----

    def pause(self, why: str = "paused by an operator") -> None:
        self.paused = why

    async def resume(self) -> None:
        """The policy acts again: a manual target and a manual override are both lifted."""
        self.paused = ""
        self.manual_target = None
        for role in _ROLES:
            if (await self._members(role)).hold:
                await self._offload(self._actuator.resume, role)
        self.hold = ""
        self.state = ScaleState()

    async def set_target(self, prefill: int, decode: int) -> DecisionRecord:
        """A manual target: the policy pauses, and the pools are brought to ``prefill`` + ``decode`` the
        way the policy would (new instances, or drained victims removed at once)."""
        c = self.config
        for role, n, low, high in (
            ("prefill", prefill, c.min_prefill, c.max_prefill),
            ("decode", decode, c.min_decode, c.max_decode),
        ):
            if not low <= n <= high:
                raise InvalidRequest(
                    f"{role} must be within {low}..{high} (autoscaler.min_/max_{role}), not {n}"
                )
        if not within_budget(prefill, decode, c):
            raise InvalidRequest(
                f"{prefill}P+{decode}D is over the budget ({c.max_instances} instances, "
                f"{c.max_accelerators} accelerators)"
            )
        await self._wait_idle()
        self.manual_target = (prefill, decode)
        self.paused = f"manual target {prefill}P+{decode}D"
        members = {role: await self._members(role) for role in _ROLES}
        obs = self.observe(members)
        victims: list[str] = []
        for role, want in zip(_ROLES, (prefill, decode), strict=True):
            ready = sorted(
                (v for v in obs.instances if v.role is role and v.state is InstanceState.READY),
                key=lambda v: (v.load, v.kv_blocks_used, v.instance_id),
            )
            coming = [v for v in obs.instances if v.role is role and v.state.on_its_way]
            extra = len(ready) + len(coming) - want
            order = self._actuator.victim_order(role, [v.instance_id for v in ready])
            victims += order[: max(0, extra)]
        decision = ScaleDecision(
            next(self._ids),
            prefill,
            decode,
            ScaleReason.SCALE_IN if victims else ScaleReason.SCALE_OUT,
            f"manual target {prefill}P+{decode}D",
            obs,
            victims=tuple(victims),
        )
        return await self._manual(decision, members)

    async def set_role(self, iid: str, role: Role) -> DecisionRecord:
        """Switch ``iid`` to ``role``: drained, then replaced in the other pool (a manual decision; the
        policy keeps running)."""
        await self._wait_idle()
        members = {r: await self._members(r) for r in _ROLES}
        obs = self.observe(members)
        view = next((v for v in obs.instances if v.instance_id == iid), None)
        if view is None:
            raise InvalidRequest(f"no instance {iid!r} in service", param="instance_id")
        if view.role is role:
            raise InvalidRequest(f"{iid} is a {role.value} instance already", param="role")
        if view.state not in (InstanceState.READY, InstanceState.DRAINED, InstanceState.WARM):
            raise InvalidRequest(f"{iid} is {view.state.value}: only a ready or drained one can switch")
        counts = [sum(1 for v in obs.instances if v.role is r and v.state.schedulable) for r in _ROLES]
        counts[_ROLES.index(view.role)] -= view.state.schedulable
        counts[_ROLES.index(role)] += 1
        decision = ScaleDecision(
            next(self._ids),
            counts[0],
            counts[1],
            ScaleReason.SCALE_OUT,
            f"manual role switch of {iid} to {role.value}",
            obs,
            flips=((iid, role),),
        )
        return await self._manual(decision, members)

    async def _manual(self, decision: ScaleDecision, members: dict[Role, PoolMembers]) -> DecisionRecord:
        record = DecisionRecord(decision, self._wall_clock(), manual=True)
        self.counts["manual"] += 1
        self._busy = asyncio.create_task(self._carry_out(record, members, keep_warm=False))
        await self.settle(self._cluster.migration.timeout_s * 8 + self._cluster.worker.start_timeout_s)
        return self.history[-1]

    async def _wait_idle(self) -> None:
        if self._busy is not None and not self._busy.done():
            await self.settle(self._cluster.migration.timeout_s * 8 + self._cluster.worker.start_timeout_s)

    def status(self) -> AutoscalerStatus:
        """Now, by the registry, and by the actuator's view of the pools at the last tick."""
        obs = self.observe(self._last_members, latencies=False)
        status = AutoscalerStatus(
            self.config.enabled,
            self._actuator.kind,
            self.paused or self.hold,
            self.manual_target,
            decode_tps=obs.decode_tps,
            prefill_miss_tps=obs.prefill_miss_tps,
            decisions=dict(self.counts),
            last=self.history[-1] if self.history else None,
        )
        for role in _ROLES:
            mine = [v for v in obs.instances if v.role is role]
            status.ready[role] = sum(v.state is InstanceState.READY for v in mine)
            status.pending[role] = sum(v.state.on_its_way for v in mine)
            status.draining[role] = sum(v.state.out_of_service for v in mine)
            last = status.last.decision if status.last else None
            target = (last.prefill, last.decode) if last else None
            if self.manual_target is not None:
                target = self.manual_target
            k = _ROLES.index(role)
            status.desired[role] = target[k] if target else status.ready[role] + status.pending[role]
        return status

    def totals(self) -> AutoscalerTotals:
        """For the metrics (carried in the cluster snapshot)."""
        st = self.status()
        return AutoscalerTotals(
            tuple((r.value, st.desired[r], st.ready[r], st.pending[r], st.draining[r]) for r in _ROLES),
            tuple(sorted(st.decisions.items())),
            st.decode_tps,
            st.prefill_miss_tps,
            bool(st.paused),
        )

    # ---- carrying a decision out ----

    async def _carry_out(
        self, record: DecisionRecord, members: dict[Role, PoolMembers], *, keep_warm: bool = True
    ) -> None:
        d = record.decision
        did = f"pdflow-{d.decision_id}-{int(record.at)}"
        actions: list[str] = []
        try:
            for iid in d.restore:
                actions.append(self._restore(iid))
            for role in _ROLES:
                cancel = tuple(i for i in d.cancel if _role_of(d, i) is role)
                if cancel:
                    actions.append(await self._scale(did, role, -len(cancel), cancel=cancel))
            for iid, role in d.flips:
                actions.append(await self._flip(did, iid, role))
            for role in _ROLES:
                extra = self._missing(d, role)
                if extra > 0:
                    actions.append(await self._scale(did, role, extra))
            for iid in d.victims:
                actions.append(await self._take_out(did, iid, _role_of(d, iid), keep_warm))
            for iid in d.remove:
                actions.append(await self._remove(did, iid))
        except Exception as exc:
            log.exception("autoscaler decision %d failed", d.decision_id)
            actions.append(f"failed: {exc}")
        finally:
            self.history.append(replace(record, actions=tuple(actions)))

    def _acts(self, d: ScaleDecision) -> bool:
        return bool(d.victims or d.restore or d.flips or d.cancel or d.remove) or any(
            self._missing(d, role) > 0 for role in _ROLES
        )

    def _missing(self, d: ScaleDecision, role: Role) -> int:
        """New instances of ``role`` the decision needs beyond those in service, on their way, put back or
        switched into it."""
        obs = d.observation
        have = sum(1 for v in obs.instances if v.role is role and (v.state.schedulable or v.state.on_its_way))
        have += sum(1 for i in d.restore if _role_of(d, i) is role)
        have += sum(1 for _, r in d.flips if r is role)
        have -= sum(1 for i, _ in d.flips if _role_of(d, i) is role and self._was_ready(d, i))
        have -= sum(1 for i in (*d.cancel, *d.victims) if _role_of(d, i) is role)
        return (d.prefill if role is Role.PREFILL else d.decode) - have

    @staticmethod
    def _was_ready(d: ScaleDecision, iid: str) -> bool:
        return any(v.instance_id == iid and v.state.schedulable for v in d.observation.instances)

    def _restore(self, iid: str) -> str:
        self._leaving.pop(iid, None)
        self._registry.uncordon(iid)
        return f"{iid}: back in service"

    async def _scale(
        self,
        did: str,
        role: Role,
        change: int,
        *,
        victims: tuple[str, ...] = (),
        cancel: tuple[str, ...] = (),
    ) -> str:
        pool = await self._members(role)
        target = pool.replicas + change
        # one id per intent: the same intent sent again (a retry) is applied once
        call_id = f"{did}/{role.value}/{target}/{','.join(victims or cancel)}"
        done: Actuation = await self._offload(  # type: ignore[assignment]
            self._actuator.scale, call_id, role, target, victims=victims, cancel=cancel
        )
        if done.outcome is Outcome.MANUAL_OVERRIDE:
            self.pause(done.detail or "manual_override")
        for iid in done.removed:
            self._registry.forget(iid)
            self._leaving.pop(iid, None)
            self._first_seen.pop(iid, None)
        detail = f": {done.detail}" if done.detail else ""
        return (
            f"{role.value} {done.replicas_before} -> {done.replicas_after} replicas: {done.outcome}{detail}"
        )

    async def _take_out(self, did: str, iid: str, role: Role, keep_warm: bool) -> str:
        """Cordon, drain, then keep warm (or remove at once)."""
        drained = await self._drain(iid, role)
        if keep_warm and self.config.warm_s > 0:
            self._move(iid, InstanceState.WARM)
            return f"{iid}: {drained}; warm for {self.config.warm_s:g} s"
        return f"{iid}: {drained}; " + await self._remove(did, iid)

    async def _remove(self, did: str, iid: str) -> str:
        leaving = self._leaving.get(iid)
        role = leaving.role if leaving is not None else self._role_in_registry(iid)
        done = await self._scale(did, role, -1, victims=(iid,))
        still = self._leaving.get(iid)
        if still is not None:  # not removed (a pod pending, a refusal): kept warm, tried again later
            if still.state is InstanceState.DRAINED:
                self._move(iid, InstanceState.WARM)
            else:
                still.since = self._clock()
        return done

    async def _flip(self, did: str, iid: str, to: Role) -> str:
        """A role switch: drained first, then removed from its pool and replaced by a new instance of the
        other (a restart in place is the worker's job; see the runtime role switch)."""
        role = self._role_in_registry(iid)
        if iid not in self._leaving:
            await self._drain(iid, role)
        removed = await self._scale(did, role, -1, victims=(iid,))
        added = await self._scale(did, to, 1)
        return f"{iid}: {role.value} -> {to.value}: {removed}; {added}"

    async def _drain(self, iid: str, role: Role) -> str:
        """Cordoned, known so by every front door, then emptied of what runs there and what is coming."""
        self._leaving[iid] = _Leaving(role, InstanceState.READY, self._clock())
        self._move(iid, InstanceState.CORDONED)
        self._registry.cordon(iid)
        await self._frontdoors.publish()
        self._move(iid, InstanceState.DRAINING)
        timeout = self._cluster.migration.timeout_s * 4

        async def inbound() -> int:
            return await self._frontdoors.inbound(iid)

        if role is Role.DECODE:
            result: DrainResult = await self._migrations.drain(iid, timeout, inbound)
            if result.remaining:
                log.warning("%s: drain left %d request(s) after %.0f s", iid, result.remaining, timeout)
            summary = (
                f"drained in {result.seconds:.1f} s ({result.moved} moved, {result.finished} finished, "
                f"{result.failed} failed attempts, {result.remaining} left)"
            )
        else:
            summary = await self._settle_prefill(iid, inbound, timeout)
        self._move(iid, InstanceState.DRAINED)
        return summary

    async def _settle_prefill(self, iid: str, inbound: Callable[[], Awaitable[int]], timeout: float) -> str:
        """A prefill worker is empty once no front door needs it and it has reported no load since."""
        started = self._clock()
        quiet_since: float | None = None  # since when no front door needs it
        while self._clock() - started < timeout:
            if await inbound() == 0:
                quiet_since = self._clock() if quiet_since is None else quiet_since
                heard = self._registry.heard_at(iid)
                inst = self._registry.snapshot(self._wall_clock()).by_id(iid)
                if inst is None or (heard is not None and heard > quiet_since and inst.load == 0):
                    return f"drained in {self._clock() - started:.1f} s"
            else:
                quiet_since = None
            await asyncio.sleep(_SETTLE_POLL_S)
        return f"still busy after {timeout:.0f} s"

    def _move(self, iid: str, state: InstanceState) -> None:
        leaving = self._leaving[iid]
        leaving.state = advance(leaving.state, state)
        leaving.since = self._clock()

    def _role_in_registry(self, iid: str) -> Role:
        inst = self._registry.snapshot(self._wall_clock()).by_id(iid)
        if inst is None:
            raise LookupError(f"no instance {iid!r}")
        return inst.role

    async def _members(self, role: Role) -> PoolMembers:
        members: PoolMembers = await self._offload(self._actuator.members, role)  # type: ignore[assignment]
        return members

    def _latencies(self) -> tuple[float | None, float | None]:
        """p99 TTFT and TPOT of the requests that finished within ``latency_window_s``."""
        since = self._wall_clock() - self.config.latency_window_s
        ttfts: list[float] = []
        tpots: list[float] = []
        for record in self._requests.list("", 0):
            if not record.state.is_terminal or not record.events or record.events[-1].at < since:
                continue
            start = record.events[0].at
            first = next((e.at for e in record.events if e.state in _FIRST_TOKEN), None)
            if first is None:
                continue
            ttfts.append(first - start)
            if record.output_tokens > 1:
                tpots.append((record.events[-1].at - first) / (record.output_tokens - 1))
        return _p99(ttfts), _p99(tpots)


_FIRST_TOKEN = frozenset(
    {
        RequestState.TRANSFERRING,
        RequestState.DECODING,
        RequestState.FINISHED_STOP,
        RequestState.FINISHED_LENGTH,
    }
)


def _role_of(d: ScaleDecision, iid: str) -> Role:
    return next(v.role for v in d.observation.instances if v.instance_id == iid)


def _view(inst: InstanceSnapshot, state: InstanceState, since: float) -> InstanceView:
    return InstanceView(
        inst.instance_id, inst.role, state, inst.load, inst.kv_blocks_used, inst.kv_blocks_total, since
    )


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
