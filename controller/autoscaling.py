"""The autoscaler loop in the controller: every ``autoscaler.interval_s`` it observes the cluster (the
registry, the request log's latencies, the actuator's view of the pools), runs the pure policy
(``policy.scaling.step``) and has its decision carried out (``controller.scale_actions``) through the
actuator it was given (Ray actors or a Kubernetes workload: ``protocol.actuation.Actuator``). One decision
at a time: a lock covers deciding and carrying out, the operator's manual targets and role switches included.

An operator can pause it, resume it, or set a manual target (which pauses the policy); a pool someone else
sized (``manual_override``) holds the loop until an operator resumes it. With ``autoscaler.enabled`` false
the policy never acts, and manual targets still work."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from controller.draining import FrontDoors
from controller.migrations import MigrationCoordinator
from controller.registry import InstanceRegistry
from controller.request_log import RequestLog
from controller.scale_actions import ROLES, ScaleActions, missing
from policy.scaling import (
    InstanceView,
    ScaleDecision,
    ScaleObservation,
    ScaleReason,
    ScaleState,
    step,
    within_budget,
)
from protocol.actuation import Actuator, PoolMembers
from protocol.config import ClusterConfig
from protocol.errors import InvalidRequest
from protocol.instances import InstanceState
from protocol.lifecycle import RequestState
from protocol.snapshots import AutoscalerTotals, InstanceSnapshot, Role

__all__ = ["AutoscalerLoop", "AutoscalerStatus", "DecisionRecord", "FrontDoors"]
log = logging.getLogger(__name__)
_HISTORY = 200
DISABLED = "autoscaler.enabled is false: manual targets only"


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
        self._clock = clock
        self._wall_clock = wall_clock
        self.actions = ScaleActions(
            config, registry, migrations, actuator, frontdoors, clock, offload or asyncio.to_thread
        )
        self.state = ScaleState()
        self.paused = "" if self.config.enabled else DISABLED
        self.hold = ""  # a pool someone else sized (the actuator's word), until an operator resumes
        self.starting = "starting: waiting for the cluster's instances to serve"  # until they first have
        self._first_tick: float | None = None
        self.manual_target: tuple[int, int] | None = None
        self._first_seen: dict[str, float] = {}
        self.history: collections.deque[DecisionRecord] = collections.deque(maxlen=_HISTORY)
        # the ones that did something, kept apart: hours of steady ticks do not push them out
        self.acted: collections.deque[DecisionRecord] = collections.deque(maxlen=_HISTORY)
        self.counts: collections.Counter[str] = collections.Counter()
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()  # held while deciding and carrying out
        self._busy: asyncio.Task[None] | None = None
        self._last_members: dict[Role, PoolMembers] = {}  # the actuator's view at the last tick
        self._rates: collections.deque[tuple[float, float, float]] = (
            collections.deque()
        )  # (at, decode, prefill)

    # ---- the loop ----

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.tick()
            except Exception:  # one bad round must not stop the autoscaler
                log.exception("autoscaler round failed")

    async def tick(self) -> DecisionRecord | None:
        """One round: observe, decide (unless paused, held, or a decision is still being carried out), and
        start carrying the decision out. Returns the decision, if one was made."""
        if self._lock.locked():
            return None
        await self._lock.acquire()
        handed_over = False
        try:
            members = await self._members()
            removed = await self.actions.remove_dead(members)
            if removed:
                self.counts["removed_dead"] += len(removed)
                members = await self._members()
            now = self._clock()
            starting = self._still_starting(members, now)
            # not before the cluster as started has come up (its workers may not all exist yet)
            if self.paused and not starting and await self.actions.keep_sizes(members, self._sizes()):
                members = await self._members()
            self.actions.readmit(members)
            for iid in self.actions.forget_departed(members):
                log.info("%s: DEAD and in no pool any more: forgotten", iid)
            for pool in members.values():
                for iid in pool.instances:
                    self._first_seen.setdefault(iid, now)
            self._last_members = members
            self.hold = "; ".join(m.hold for m in members.values() if m.hold)
            if self.paused or self.hold or starting:
                return None
            observation = self.observe(members)
            self._record_rates(now)
            decision, self.state = step(observation, self.state, now, self.config)
            record = DecisionRecord(replace(decision, decision_id=next(self._ids)), self._wall_clock())
            self.counts[decision.reason.value] += 1
            if not self._acts(record.decision):
                self.history.append(record)
                return record
            log.info(
                "autoscaler decision %d: %s (%s)",
                record.decision.decision_id,
                decision.reason,
                decision.detail,
            )
            self._busy = asyncio.create_task(self._run(record))
            handed_over = True
            return record
        finally:
            if not handed_over:
                self._lock.release()

    async def settle(self, timeout_s: float) -> None:
        """Wait until the decision being carried out is done (tests, shutdown)."""
        if self._busy is not None:
            await asyncio.wait_for(asyncio.shield(self._busy), timeout_s)

    def observe(self, members: dict[Role, PoolMembers], *, latencies: bool = True) -> ScaleObservation:
        """The policy's inputs, read without changing anything: every instance (the registry's, the ones
        the actuator has on their way, and the lifecycle of those being taken out), the decode and
        cache-miss prompt tokens/s, and the p99 latencies of the requests that finished within the window."""
        now = self._clock()
        views: list[InstanceView] = []
        known = set()
        decode_tps = prefill_tps = 0.0
        present = {iid for pool in members.values() for iid in pool.instances}
        for inst in self._registry.snapshot(self._wall_clock()).instances:
            known.add(inst.instance_id)
            if inst.state is InstanceState.DEAD:
                continue
            if inst.state is InstanceState.STARTING and inst.instance_id not in present:
                continue  # it died while it started (it has the start deadline to report again): no supply
            if inst.role is Role.DECODE:
                decode_tps += inst.decode_tps
            else:
                prefill_tps += inst.prompt_tps
            leaving = self.actions.leaving.get(inst.instance_id)
            if leaving is None and inst.state is InstanceState.CORDONED:
                continue  # an operator's cordon: neither supply nor the autoscaler's to touch
            state = leaving.state if leaving is not None else inst.state
            since = leaving.since if leaving is not None else self._first_seen.get(inst.instance_id, now)
            views.append(_view(inst, state, since))
        for role, pool in members.items():
            for iid in pool.instances:
                if iid in known or iid in self.actions.leaving:
                    continue
                state = InstanceState.PENDING if iid in pool.pending else InstanceState.STARTING
                views.append(InstanceView(iid, role, state, since=self._first_seen.get(iid, now)))
        ttft, tpot = self._latencies() if latencies else (None, None)
        decode_tps, prefill_tps = self._smoothed(now, decode_tps, prefill_tps)
        return ScaleObservation(decode_tps, prefill_tps, ttft, tpot, tuple(views))

    def _smoothed(self, now: float, decode_tps: float, prefill_tps: float) -> tuple[float, float]:
        """The mean of the rates over ``metric_window_s``, this reading included (read, not recorded:
        ``tick`` records one reading per round)."""
        window = [(d, p) for at, d, p in self._rates if now - at <= self.config.metric_window_s]
        window.append((decode_tps, prefill_tps))
        return sum(d for d, _ in window) / len(window), sum(p for _, p in window) / len(window)

    def _record_rates(self, now: float) -> None:
        decode = prefill = 0.0
        for inst in self._registry.snapshot(self._wall_clock()).instances:
            if inst.state is not InstanceState.DEAD:
                if inst.role is Role.DECODE:
                    decode += inst.decode_tps
                else:
                    prefill += inst.prompt_tps
        self._rates.append((now, decode, prefill))
        while self._rates and now - self._rates[0][0] > self.config.metric_window_s:
            self._rates.popleft()

    # ---- the operator's controls ----

    def pause(self, why: str = "paused by an operator") -> None:
        self.paused = why

    async def resume(self) -> None:
        """The policy acts again (if ``autoscaler.enabled``): a manual target and a manual override are
        both lifted."""
        for role in ROLES:
            if (await self.actions.members(role)).hold:
                await self.actions.resume(role)
        self.hold = ""
        self.manual_target = None
        self.paused = "" if self.config.enabled else DISABLED
        self.state = ScaleState()

    async def set_target(self, prefill: int, decode: int) -> DecisionRecord:
        """A manual target: the policy pauses, and the pools are brought to ``prefill`` + ``decode``: warm
        instances put back and new ones started, or instances on their way cancelled and then drained
        victims removed at once (no warm window)."""
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
        await self._lock.acquire()
        try:
            self.manual_target = (prefill, decode)
            self.paused = f"manual target {prefill}P+{decode}D"
            obs = self.observe(await self._members(), latencies=False)
            why = f"manual target {prefill}P+{decode}D"
            decision = ScaleDecision(next(self._ids), prefill, decode, ScaleReason.STEADY, why, obs)
            record = DecisionRecord(self._manual_moves(decision), self._wall_clock(), manual=True)
        except BaseException:
            self._lock.release()
            raise
        return await self._hand_over(self._carry_out(record, keep_warm=False, release=True))

    async def set_role(self, iid: str, role: Role) -> DecisionRecord:
        """Switch ``iid`` to ``role``: drained, then moved to the other pool in place (or, where the actuator
        cannot, replaced there). A manual decision; the policy keeps running."""
        await self._lock.acquire()
        try:
            obs = self.observe(await self._members(), latencies=False)
            view = next((v for v in obs.instances if v.instance_id == iid), None)
            if view is None:
                raise InvalidRequest(f"no instance {iid!r} in service", param="instance_id")
            if view.role is role:
                raise InvalidRequest(f"{iid} is a {role.value} instance already", param="role")
            if view.state not in (InstanceState.READY, InstanceState.DRAINED, InstanceState.WARM):
                raise InvalidRequest(f"{iid} is {view.state.value}: only a ready or drained one can switch")
            counts = [sum(1 for v in obs.instances if v.role is r and v.state.schedulable) for r in ROLES]
            counts[ROLES.index(view.role)] -= view.state.schedulable
            counts[ROLES.index(role)] += 1
            decision = ScaleDecision(
                next(self._ids),
                counts[0],
                counts[1],
                ScaleReason.STEADY,
                f"manual role switch of {iid} to {role.value}",
                obs,
                flips=((iid, role),),
            )
            record = DecisionRecord(decision, self._wall_clock(), manual=True)
        except BaseException:
            self._lock.release()
            raise
        return await self._hand_over(self._switch(record, iid, role))

    async def _switch(self, record: DecisionRecord, iid: str, role: Role) -> DecisionRecord:
        """Carry a manual role switch out (the lock is held, and let go after)."""
        try:
            self.counts["manual"] += 1
            did = f"pdflow-{record.decision.decision_id}-{int(record.at)}"
            try:
                action = await self.actions.flip(did, iid, role)
            except Exception as exc:
                log.exception("switching %s failed", iid)
                action = f"failed: {type(exc).__name__}: {exc}"
            done = replace(record, actions=(action,))
            self._remember(done)
            return done
        finally:
            self._lock.release()

    def _still_starting(self, members: dict[Role, PoolMembers], now: float) -> bool:
        """The policy waits for the instances there at the first tick (the cluster as it was started) until
        each has served once, or ``worker.start_timeout_s`` has passed: an engine still starting is no sign
        that demand fell, and cancelling it would fail the cluster's start."""
        if not self.starting:
            return False
        self._first_tick = now if self._first_tick is None else self._first_tick
        served = {i.instance_id for i in self._registry.snapshot(self._wall_clock()).instances}
        waiting = sorted(i for pool in members.values() for i in pool.instances if i not in served)
        if waiting and now - self._first_tick < self._cluster.worker.start_timeout_s:
            self.starting = f"starting: waiting for {', '.join(waiting)} to serve"
            return True
        self.starting = ""
        self.state = ScaleState()  # the counters start with the cluster up
        return False

    async def _hand_over(self, work: Awaitable[DecisionRecord]) -> DecisionRecord:
        """Run ``work`` as its own task: a caller that goes away (an admin call past its deadline) does not
        stop a drain half way."""
        task = asyncio.ensure_future(work)
        self._busy = task  # type: ignore[assignment]
        return await asyncio.shield(task)

    def status(self) -> AutoscalerStatus:
        """Now, by the registry, and by the actuator's view of the pools at the last tick."""
        obs = self.observe(self._last_members, latencies=False)
        status = AutoscalerStatus(
            self.config.enabled,
            self.actions.actuator.kind,
            self.paused or self.hold or self.starting,
            self.manual_target,
            decode_tps=obs.decode_tps,
            prefill_miss_tps=obs.prefill_miss_tps,
            decisions=dict(self.counts),
            last=self.history[-1] if self.history else None,
        )
        last = status.last.decision if status.last else None
        target = self.manual_target or ((last.prefill, last.decode) if last else None)
        for k, role in enumerate(ROLES):
            mine = [v for v in obs.instances if v.role is role]
            status.ready[role] = sum(v.state is InstanceState.READY for v in mine)
            status.pending[role] = sum(v.state.on_its_way for v in mine)
            status.draining[role] = sum(v.state.out_of_service for v in mine)
            status.desired[role] = target[k] if target else status.ready[role] + status.pending[role]
        return status

    def _sizes(self) -> dict[Role, int]:
        """The pools' sizes while no policy decides: the operator's target, else the last decision's, else
        the configured replicas."""
        last = self.history[-1].decision if self.history else None
        target = self.manual_target or ((last.prefill, last.decode) if last else None)
        if target is None:
            target = (self._cluster.prefill.replicas, self._cluster.decode.replicas)
        return dict(zip(ROLES, target, strict=True))

    def totals(self) -> AutoscalerTotals:
        """For the metrics (carried in the cluster snapshot)."""
        st = self.status()
        return AutoscalerTotals(
            tuple((r.value, st.desired[r], st.ready[r], st.pending[r], st.draining[r]) for r in ROLES),
            # every reason from the start, at 0: a dashboard's rate sees the first decision of each
            tuple(
                sorted(
                    (
                        {r.value: 0 for r in ScaleReason} | {"manual": 0, "removed_dead": 0} | st.decisions
                    ).items()
                )
            ),
            st.decode_tps,
            st.prefill_miss_tps,
            bool(st.paused),
            self.config.target_decode_tps,
            self.config.target_prefill_tps,
            self.config.enabled,
        )

    # ---- helpers ----

    async def _run(self, record: DecisionRecord) -> None:
        await self._carry_out(record, keep_warm=True, release=True)

    async def _carry_out(
        self, record: DecisionRecord, *, keep_warm: bool, release: bool = False
    ) -> DecisionRecord:
        """Carry ``record`` out (the lock is held); ``release``: let the lock go after."""
        d = record.decision
        actions: list[str] = []
        try:
            if record.manual:
                self.counts["manual"] += 1
            did = f"pdflow-{d.decision_id}-{int(record.at)}"
            actions = await self.actions.carry_out(d, did, keep_warm=keep_warm)
        except Exception as exc:
            log.exception("autoscaler decision %d failed", d.decision_id)
            actions.append(f"failed: {type(exc).__name__}: {exc}")
        finally:
            if release:
                self._lock.release()
        done = replace(record, actions=tuple(actions))
        self._remember(done)
        return done

    def _remember(self, record: DecisionRecord) -> None:
        self.history.append(record)
        if record.actions:
            self.acted.append(record)

    def _manual_moves(self, d: ScaleDecision) -> ScaleDecision:
        """The moves to a manual target, per pool: more: put back warm instances first (new ones are started
        for the rest); fewer: cancel instances on their way (newest first), then drain the least loaded ready
        ones this pool can remove; warm instances beyond the target go."""
        restore: list[str] = []
        cancel: list[str] = []
        victims: list[str] = []
        remove: list[str] = []
        for role, want in zip(ROLES, (d.prefill, d.decode), strict=True):
            mine = [v for v in d.observation.instances if v.role is role]
            ready = sorted(
                (v for v in mine if v.state.schedulable),
                key=lambda v: (v.load, v.kv_blocks_used, v.instance_id),
            )
            coming = sorted((v for v in mine if v.state.on_its_way), key=lambda v: (-v.since, v.instance_id))
            idle = [v.instance_id for v in mine if v.state in (InstanceState.DRAINED, InstanceState.WARM)]
            extra = len(ready) + len(coming) - want
            if extra < 0:
                restore += idle[:-extra]
                remove += idle[-extra:]
                continue
            remove += idle
            cancel += [v.instance_id for v in coming[:extra]]
            extra -= min(extra, len(coming))
            order = self.actions.actuator.victim_order(role, [v.instance_id for v in ready])
            victims += order[:extra]
        return replace(
            d, restore=tuple(restore), cancel=tuple(cancel), victims=tuple(victims), remove=tuple(remove)
        )

    def _acts(self, d: ScaleDecision) -> bool:
        moves = d.victims or d.restore or d.cancel or d.remove or d.flips
        in_place = self.actions.actuator.switches_in_place
        return bool(moves) or any(missing(d, role, in_place=in_place) > 0 for role in ROLES)

    async def _members(self) -> dict[Role, PoolMembers]:
        return {role: await self.actions.members(role) for role in ROLES}

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
        least = self.config.latency_min_samples
        return _p99(ttfts) if len(ttfts) >= least else None, _p99(tpots) if len(tpots) >= least else None


_FIRST_TOKEN = frozenset(
    {
        RequestState.TRANSFERRING,
        RequestState.DECODING,
        RequestState.FINISHED_STOP,
        RequestState.FINISHED_LENGTH,
    }
)


def _view(inst: InstanceSnapshot, state: InstanceState, since: float) -> InstanceView:
    return InstanceView(
        inst.instance_id, inst.role, state, inst.load, inst.kv_blocks_used, inst.kv_blocks_total, since
    )


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
