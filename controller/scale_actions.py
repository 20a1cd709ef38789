"""Carrying the autoscaler's decisions out, move by move, through the actuator; and the lifecycle of the
instances taken out of service (``protocol.instances``), which the registry's cordon keeps out of dispatch.

A scale-in loses nothing. The victim is cordoned and every front door is sent the snapshot that says so (and
answers); then it is drained (``controller.draining``): its running requests move by live migration
(recompute as the last resort), and the requests still on their way to it (prefilling for it, being handed
over, migrating to it) are waited for and moved once they land. A prefill victim is drained by waiting for
its prompts and their hand-offs. A drain
that does not finish puts the instance back in service; a drained instance is checked again just before it
is removed, and put back if it holds anything."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from controller.draining import FrontDoors, drain_instance
from controller.migrations import MigrationCoordinator
from controller.registry import InstanceRegistry
from policy.scaling import ScaleDecision
from protocol.actuation import Actuation, Actuator, Outcome, PoolMembers
from protocol.config import ClusterConfig
from protocol.errors import InvalidRequest
from protocol.instances import TRANSITIONS, InstanceState, advance
from protocol.snapshots import Role

log = logging.getLogger(__name__)
T = TypeVar("T")
ROLES = (Role.PREFILL, Role.DECODE)
_SETTLE_POLL_S = 0.2
ACTUATOR_CALL_S = 300.0  # one actuator call: a Kubernetes scale-in waits for the pod's deletion to start


@dataclass
class Leaving:
    """An instance the autoscaler is taking out of service."""

    role: Role
    state: InstanceState
    since: float


class ScaleActions:
    def __init__(
        self,
        config: ClusterConfig,
        registry: InstanceRegistry,
        migrations: MigrationCoordinator,
        actuator: Actuator,
        frontdoors: FrontDoors,
        clock: Callable[[], float],
        offload: Callable[..., Awaitable[object]],
    ) -> None:
        self._config = config
        self._registry = registry
        self._migrations = migrations
        self.actuator = actuator
        self._frontdoors = frontdoors
        self._clock = clock
        self._offload = offload
        self.leaving: dict[str, Leaving] = {}
        self.removed_at: dict[str, float] = {}  # instance -> when the actuator removed it (``clock``)

    async def members(self, role: Role) -> PoolMembers:
        return await self._call(self.actuator.members, role)

    async def resume(self, role: Role) -> PoolMembers:
        return await self._call(self.actuator.resume, role)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A blocking actuator call, off the event loop, within ``ACTUATOR_CALL_S``."""
        return cast(T, await asyncio.wait_for(self._offload(fn, *args, **kwargs), ACTUATOR_CALL_S))

    async def carry_out(self, d: ScaleDecision, did: str, *, keep_warm: bool) -> list[str]:
        """Every move of ``d``, in order: put back, cancel, switch idle instances, start, switch ready ones
        (after a drain), take out, remove. Returns what each did, in words."""
        actions: list[str] = []
        for iid in d.restore:
            actions.append(self.restore(iid))
        for role in ROLES:
            cancel = tuple(i for i in d.cancel if role_of(d, i) is role)
            if cancel:
                actions.append((await self.scale(did, role, -len(cancel), cancel=cancel))[0])
        in_place = self.actuator.switches_in_place
        idle = [(iid, role) for iid, role in d.flips if self._idle(d, iid)]
        ready = [(iid, role) for iid, role in d.flips if in_place and not self._idle(d, iid)]
        for iid, role in idle:  # drained or warm already: at once
            actions.append(await self.flip(did, iid, role))
        for role in ROLES:  # new instances start before any drain below holds the decision up
            extra = missing(d, role, in_place=in_place)
            if extra > 0:
                actions.append((await self.scale(did, role, extra))[0])
        for iid, role in ready:  # drained first; elsewhere a ready one stays and its pool starts one
            actions.append(await self.flip(did, iid, role))
        for iid in self._victims(d):
            actions.append(await self.take_out(did, iid, role_of(d, iid), keep_warm=keep_warm))
        for iid in d.remove:
            actions.append(await self.remove(did, iid))
        return actions

    def restore(self, iid: str) -> str:
        leaving = self.leaving.pop(iid, None)
        if leaving is not None:
            advance(leaving.state, InstanceState.READY)
        try:
            self._registry.uncordon(iid)
        except KeyError:
            return f"{iid}: gone, not put back"
        return f"{iid}: back in service"

    async def scale(
        self,
        did: str,
        role: Role,
        change: int,
        *,
        victims: tuple[str, ...] = (),
        cancel: tuple[str, ...] = (),
    ) -> tuple[str, Actuation]:
        pool = await self.members(role)
        # one id per intent, whatever the pool's size when it is sent: sent again, it is applied once
        call_id = f"{did}/{role.value}/{change:+d}/{','.join(victims or cancel)}"
        done = await self._call(
            self.actuator.scale, call_id, role, pool.replicas + change, victims=victims, cancel=cancel
        )
        for iid in done.removed:
            leaving = self.leaving.pop(iid, None)
            if leaving is not None and InstanceState.TERMINATED in TRANSITIONS[leaving.state]:
                advance(leaving.state, InstanceState.TERMINATED)
            self._registry.forget(iid)
            self.removed_at[iid] = self._clock()
        detail = f": {done.detail}" if done.detail else ""
        text = (
            f"{role.value} {done.replicas_before} -> {done.replicas_after} replicas: {done.outcome}{detail}"
        )
        return text, done

    async def take_out(self, did: str, iid: str, role: Role, *, keep_warm: bool) -> str:
        """Cordon and drain ``iid``, then keep it warm (or remove it at once); put it back if the drain fails
        or does not finish."""
        try:
            drained, empty = await self._drain(iid, role)
        except Exception as exc:  # a front door that did not answer, a worker gone: back in service
            log.exception("draining %s failed", iid)
            return f"{iid}: drain failed ({type(exc).__name__}: {exc}); " + self.restore(iid)
        if not empty:
            return f"{iid}: {drained}; " + self.restore(iid)
        if keep_warm and self._config.autoscaler.warm_s > 0:
            self._move(iid, InstanceState.WARM)
            return f"{iid}: {drained}; warm for {self._config.autoscaler.warm_s:g} s"
        return f"{iid}: {drained}; " + await self.remove(did, iid)

    async def remove(self, did: str, iid: str) -> str:
        """Remove a drained (or warm) instance, if it still holds nothing; otherwise put it back."""
        leaving = self.leaving.get(iid)
        role = leaving.role if leaving is not None else self._role_in_registry(iid)
        held = await self._holds(iid, role)
        if held:
            return f"{iid}: holds {held} request(s) when it was to go; " + self.restore(iid)
        text, done = await self.scale(did, role, -1, victims=(iid,))
        still = self.leaving.get(iid)
        if still is not None and done.outcome is not Outcome.APPLIED:  # kept warm, tried again later
            if still.state is InstanceState.DRAINED:
                self._move(iid, InstanceState.WARM)
            else:
                still.since = self._clock()
        return text

    async def flip(self, did: str, iid: str, to: Role) -> str:
        """A role switch: drained first (unless it is already), then moved to the other pool in place where
        the actuator can, else removed from its pool and replaced by a new instance of the other. If it
        cannot be drained or switched, it is back in service where it was."""
        role = self._role_in_registry(iid)
        started = self._clock()
        drained = "drained already"
        try:
            leaving = self.leaving.get(iid)
            if leaving is None or leaving.state not in (InstanceState.DRAINED, InstanceState.WARM):
                drained, empty = await self._drain(iid, role)
                if not empty:
                    return f"{iid}: {drained}; " + self.restore(iid)
            if self.actuator.switches_in_place:
                return f"{iid}: {drained}; " + await self._switch(did, iid, role, to, started)
        except Exception as exc:  # a front door that did not answer, a worker gone: back in service
            log.exception("switching %s failed", iid)
            return f"{iid}: switch failed ({type(exc).__name__}: {exc}); " + self.restore(iid)
        removed, done = await self.scale(did, role, -1, victims=(iid,))
        if done.outcome is not Outcome.APPLIED:
            return f"{iid}: not switched: {removed}"
        added, _ = await self.scale(did, to, 1)
        return f"{iid}: {role.value} -> {to.value}: {removed}; {added}"

    async def _switch(self, did: str, iid: str, role: Role, to: Role, started: float) -> str:
        """The drained ``iid`` serves as ``to`` once it reports so; then it is back in service. If it does not
        switch, it is back in service in its old role."""
        done = await self._call(self.actuator.switch, f"{did}/switch/{iid}", iid, to)
        if done.outcome not in (Outcome.APPLIED, Outcome.UNCHANGED):
            return f"not switched ({done.outcome}: {done.detail}); " + self.restore(iid)
        self._move(iid, InstanceState.STARTING)
        deadline = self._clock() + self._config.controller.heartbeat_timeout_s
        while self._role_in_registry(iid) is not to and self._clock() < deadline:
            await asyncio.sleep(_SETTLE_POLL_S)  # its report is on its way
        late = "" if self._role_in_registry(iid) is to else " (not reported yet)"
        back = self.restore(iid)  # either role's calls work on it: its engine is the same
        return f"{role.value} -> {to.value} in place in {self._clock() - started:.1f} s{late}; {back}"

    async def remove_dead(self, members: dict[Role, PoolMembers]) -> list[str]:
        """Instances the actuator still runs whose worker is DEAD are removed, so that the policy's scale-out
        (or ``keep_sizes``) replaces them: at once if the worker said so (its engine failed), after three
        heartbeat timeouts of silence otherwise (a starved worker may be late, not dead)."""
        snapshot = self._registry.snapshot(0.0)
        timeout = self._config.controller.heartbeat_timeout_s
        removed: list[str] = []
        for role, pool in members.items():
            for iid in pool.instances:
                inst = snapshot.by_id(iid)
                if inst is None or inst.state is not InstanceState.DEAD:  # warm ones that died too
                    continue
                if timeout <= self._registry.seconds_since_report(iid, self._clock()) <= 3 * timeout:
                    continue
                text, done = await self.scale(f"dead-{iid}", role, -1, victims=(iid,))
                log.warning("%s is DEAD: %s", iid, text)
                if done.outcome in (Outcome.APPLIED, Outcome.UNCHANGED):
                    removed.append(iid)
        return removed

    async def keep_sizes(self, members: dict[Role, PoolMembers], sizes: dict[Role, int]) -> bool:
        """With no policy deciding (the autoscaler off or paused), a pool with fewer instances than its size
        (a worker that died, was removed as dead, or never started) gets new ones. A workload controller
        that keeps its own pods (a StatefulSet) is asked for the size it already has: nothing changes.
        Whether it started any."""
        started = False
        for role, pool in members.items():
            size = sizes[role]
            if len(pool.instances) >= size:
                continue
            # a new id each time: the same pool may lose an instance again later, with the same ones left
            call_id = f"keep-{role.value}-{size}-{self._clock():.6f}"
            done = await self._call(self.actuator.scale, call_id, role, size)
            if done.outcome is Outcome.APPLIED:
                log.warning(
                    "the %s pool had %d of its %d instances: %s",
                    role.value,
                    len(pool.instances),
                    size,
                    done.detail,
                )
                started = True
        return started

    def readmit(self, members: dict[Role, PoolMembers]) -> None:
        """An instance id the actuator reports again, long after it removed one of that id (a StatefulSet's
        ordinal), is a new instance: its reports count again."""
        quiet = 3 * self._config.controller.heartbeat_timeout_s
        for pool in members.values():
            for iid in pool.instances:
                at = self.removed_at.get(iid)
                if at is not None and self._clock() - at > quiet:
                    self._registry.admit(iid)
                    del self.removed_at[iid]

    def forget_departed(self, members: dict[Role, PoolMembers]) -> list[str]:
        """A DEAD instance that no pool has any more (its pod or actor is gone: a rolling update replaced
        it, or it crashed and its workload started another) is forgotten once silent for three heartbeat
        timeouts, so that status and the metrics stop listing it. Its id may serve again later (a
        StatefulSet's ordinal): ``readmit``."""
        present = {iid for pool in members.values() for iid in pool.instances}
        quiet = 3 * self._config.controller.heartbeat_timeout_s
        forgotten: list[str] = []
        for inst in self._registry.snapshot(0.0).instances:
            iid = inst.instance_id
            if inst.state is not InstanceState.DEAD or iid in present or iid in self.leaving:
                continue
            if self._registry.seconds_since_report(iid, self._clock()) > quiet:
                self._registry.forget(iid)
                self.removed_at[iid] = self._clock()
                forgotten.append(iid)
        return forgotten

    # ---- draining ----

    async def _drain(self, iid: str, role: Role) -> tuple[str, bool]:
        """Cordoned, known so by every front door, then emptied of what runs there and what is coming.
        Returns what happened and whether it is empty."""
        self.leaving[iid] = Leaving(role, InstanceState.READY, self._clock())
        self._move(iid, InstanceState.CORDONED)
        self._move(iid, InstanceState.DRAINING)
        result = await drain_instance(
            iid,
            role,
            registry=self._registry,
            migrations=self._migrations,
            frontdoors=self._frontdoors,
            timeout_s=self._config.migration.timeout_s * 4,
            clock=self._clock,
        )
        if role is Role.DECODE:
            summary = (
                f"drained in {result.seconds:.1f} s ({result.moved} moved, {result.finished} finished, "
                f"{result.failed} failed attempts, {result.remaining} left)"
            )
        elif result.remaining:
            summary = f"still busy after {result.seconds:.0f} s"
        else:
            summary = f"drained in {result.seconds:.1f} s"
        empty = result.remaining == 0
        if empty:
            self._move(iid, InstanceState.DRAINED)
        return summary, empty

    async def _holds(self, iid: str, role: Role) -> int:
        """What a drained instance still holds or has coming (0 when it can go)."""
        coming = await self._frontdoors.inbound(iid)
        if role is Role.DECODE:
            try:
                return coming + len(await self._migrations.running_on(iid))
            except InvalidRequest:  # DEAD or gone: it holds nothing any more
                return coming
        inst = self._registry.snapshot(0.0).by_id(iid)
        return coming + (inst.load if inst is not None else 0)

    # ---- helpers ----

    def _victims(self, d: ScaleDecision) -> list[str]:
        """The decision's victims, each replaced by one its pool can remove if it cannot (a StatefulSet
        removes only its highest ordinal)."""
        chosen: list[str] = []
        for role in ROLES:
            mine = [i for i in d.victims if role_of(d, i) is role]
            if not mine:
                continue
            ready = sorted(
                (v for v in d.observation.instances if v.role is role and v.state.schedulable),
                key=lambda v: (v.load, v.kv_blocks_used, v.instance_id),
            )
            allowed = self.actuator.victim_order(role, [v.instance_id for v in ready])
            picks = [i for i in mine if i in allowed]
            picks += [i for i in allowed if i not in picks][: len(mine) - len(picks)]
            chosen += picks
        return chosen

    @staticmethod
    def _idle(d: ScaleDecision, iid: str) -> bool:
        return any(
            v.instance_id == iid and v.state in (InstanceState.DRAINED, InstanceState.WARM)
            for v in d.observation.instances
        )

    def _move(self, iid: str, state: InstanceState) -> None:
        leaving = self.leaving[iid]
        leaving.state = advance(leaving.state, state)
        leaving.since = self._clock()

    def _role_in_registry(self, iid: str) -> Role:
        inst = self._registry.snapshot(0.0).by_id(iid)
        if inst is None:
            raise LookupError(f"no instance {iid!r}")
        return inst.role


def role_of(d: ScaleDecision, iid: str) -> Role:
    return next(v.role for v in d.observation.instances if v.instance_id == iid)


def missing(d: ScaleDecision, role: Role, *, in_place: bool) -> int:
    """New instances of ``role`` the decision needs beyond those in service, on their way, put back or
    switched into it. Every switch counts where the actuator switches in place; elsewhere only drained or
    warm instances switch (a ready one stays where it is, and the pool that needs more starts one)."""
    idle = (InstanceState.DRAINED, InstanceState.WARM)
    states = {v.instance_id: v.state for v in d.observation.instances}
    have = sum(
        1 for v in d.observation.instances if v.role is role and (v.state.schedulable or v.state.on_its_way)
    )
    have += sum(1 for i in d.restore if role_of(d, i) is role)
    for iid, to in d.flips:
        if in_place or states.get(iid) in idle:
            have += to is role
            have -= role_of(d, iid) is role and states.get(iid) is InstanceState.READY
    have -= sum(1 for i in (*d.cancel, *d.victims) if role_of(d, i) is role)
    return (d.prefill if role is Role.PREFILL else d.decode) - have
