"""Autoscaling both pools together on one metric (HeteroScale), pure: ``step(observation, state, now,
config) -> (ScaleDecision, state)`` does no I/O and keeps nothing in ``self``; the controller's loop, the
tests and the simulator call the same function, and the same inputs give the same decisions.

The law. The decode pool is ``D = ceil(decode tokens/s / target_decode_tps)``; the prefill pool follows the
``p:d`` shape, ``P = ceil(D x p / d)``, or more if cache-miss prompt tokens/s need more
(``target_prefill_tps``). A p99 latency over its SLO asks for 10% more capacity (20% past ``severe_breach`` x
SLO); latency never takes capacity away. Within a dead band around the decode pool's ready capacity nothing
changes. Growth needs ``out_ticks`` consecutive ticks asking for it (fast), shrinking ``in_ticks`` (slow); the
counters live in the returned state. Bounds per pool, then a budget in instances and in accelerators, cap the
targets.

Both pools move in one action, to targets that keep the shape. Scaling out first puts back instances on
their way out (no cold start), then restarts drained or warm instances of the other pool in this role, or its
least loaded ready ones while it has more than it asks for (a role switch: seconds, not a cold start), and
only then asks for new ones. Scaling in is one decode instance at a time (the prefill pool following the
shape), and only when nothing of that pool is still on its way (pending instances are cancelled first when
demand falls); before it, a consolidation check: each survivor would carry ``x N/(N-1)`` of today's load,
which must stay under ``target x sensitivity`` and within ``kv_limit`` of its KV blocks, or the policy holds
(``REFUSED_CONSOLIDATION``). The victim is the least loaded ready instance; it is cordoned, drained and kept
warm for ``warm_s``, put back at once if an SLO regresses meanwhile, and removed after.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from protocol.instances import InstanceState
from protocol.scaling_config import AutoscalerConfig
from protocol.snapshots import Role

_FEEDBACK = (1.0, 1.1, 1.2)  # capacity asked for at latency tier 0, 1 (over SLO), 2 (severe)


class ScaleReason(enum.StrEnum):
    STEADY = "steady"  # the pools match the demand (or it is within the dead band)
    SCALE_OUT = "scale_out"
    SCALE_IN = "scale_in"
    WAITING_OUT = "waiting_out"  # more is needed, for fewer ticks than out_ticks so far
    WAITING_IN = "waiting_in"  # less is needed, for fewer ticks than in_ticks so far
    LATENCY = "latency"  # out, because a p99 latency is over its SLO
    PREFILL_PRESSURE = "prefill_pressure"  # out, because cache-miss prompt tokens/s need more prefill
    BUDGET = "budget"  # capped by a bound or the budget
    PENDING = "pending"  # in is due, but instances of that pool are still on their way
    CANCEL_PENDING = "cancel_pending"  # demand fell below what is on its way: cancel it
    REFUSED_CONSOLIDATION = "refused_consolidation"  # in is due, but the survivors could not carry the load
    RESTORE_WARM = "restore_warm"  # an SLO regressed while a victim was warm: put it back
    REMOVE_WARM = "remove_warm"  # a warm victim's window passed


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One instance as the policy sees it."""

    instance_id: str
    role: Role
    state: InstanceState
    load: int = 0  # requests it runs or queues
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    since: float = 0.0  # when it entered ``state``, on the clock of ``now``


@dataclass(frozen=True, slots=True)
class ScaleObservation:
    """What the policy decides from: the metric, the latencies, the instances."""

    decode_tps: float
    prefill_miss_tps: float = 0.0
    ttft_p99_s: float | None = None
    tpot_p99_s: float | None = None
    instances: tuple[InstanceView, ...] = ()

    def of(self, role: Role, *states: InstanceState) -> list[InstanceView]:
        return sorted(
            (i for i in self.instances if i.role is role and i.state in states), key=lambda i: i.instance_id
        )


@dataclass(frozen=True, slots=True)
class ScaleState:
    """What the policy remembers between ticks; the caller keeps it and hands it back."""

    over_ticks: int = 0  # consecutive ticks asking for more (of either pool)
    under_ticks: int = 0  # consecutive ticks asking for less (of both, or one and no more of the other)
    decisions: int = 0


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """Targets (instances in service or on their way) and the moves that reach them; every decision says
    why and carries the inputs it saw."""

    decision_id: int
    prefill: int
    decode: int
    reason: ScaleReason
    detail: str
    observation: ScaleObservation
    victims: tuple[str, ...] = ()  # ready instances to cordon, drain and keep warm
    restore: tuple[str, ...] = ()  # cordoned, draining, drained or warm instances to put back in service
    flips: tuple[tuple[str, Role], ...] = ()  # drained or warm instances to restart in the other role
    cancel: tuple[str, ...] = ()  # pending or starting instances to give up
    remove: tuple[str, ...] = ()  # warm instances whose window passed


_READY = (InstanceState.READY,)
_COMING = (InstanceState.PENDING, InstanceState.STARTING)
_LEAVING = (InstanceState.CORDONED, InstanceState.DRAINING, InstanceState.DRAINED, InstanceState.WARM)
_IDLE = (InstanceState.DRAINED, InstanceState.WARM)
_ROLES = (Role.PREFILL, Role.DECODE)


def latency_tier(obs: ScaleObservation, config: AutoscalerConfig) -> int:
    """0: both p99s within their SLOs (or unknown); 1: one over; 2: one over ``severe_breach`` x its SLO."""
    ratios = [
        p99 / slo
        for p99, slo in ((obs.ttft_p99_s, config.ttft_slo_s), (obs.tpot_p99_s, config.tpot_slo_s))
        if p99 is not None
    ]
    worst = max(ratios, default=0.0)
    return 2 if worst > config.severe_breach else 1 if worst > 1.0 else 0


def pools(decode: int, pressure: int, config: AutoscalerConfig) -> tuple[int, int]:
    """The (prefill, decode) pools for ``decode`` decode instances wanted and ``pressure`` prefill instances
    the prompts need: decode within its bounds; prefill by the shape from that decode pool (rounded up) or by
    the pressure if that is more, within its bounds; then, over the budget, the decode pool gives up an
    instance at a time (the prefill pool following its shape), then the prefill pool."""
    p, d = config.ratio

    def prefill_for(dc: int) -> int:
        return min(max(math.ceil(dc * p / d - 1e-9), pressure, config.min_prefill), config.max_prefill)

    decode = min(max(decode, config.min_decode), config.max_decode)
    prefill = prefill_for(decode)
    while not within_budget(prefill, decode, config) and decode > config.min_decode:
        decode -= 1
        prefill = prefill_for(decode)
    while not within_budget(prefill, decode, config) and prefill > config.min_prefill:
        prefill -= 1
    return prefill, decode


def within_budget(prefill: int, decode: int, config: AutoscalerConfig) -> bool:
    accelerators = prefill * config.accelerators_per_prefill + decode * config.accelerators_per_decode
    return prefill + decode <= config.max_instances and accelerators <= config.max_accelerators


def step(
    obs: ScaleObservation, state: ScaleState, now: float, config: AutoscalerConfig
) -> tuple[ScaleDecision, ScaleState]:
    """One tick of the autoscaler (see the module). ``now`` is on the clock of the instances' ``since``."""
    tier = latency_tier(obs, config)
    factor = _FEEDBACK[tier]
    current = (len(obs.of(Role.PREFILL, *_READY, *_COMING)), len(obs.of(Role.DECODE, *_READY, *_COMING)))
    decode = math.ceil(obs.decode_tps * factor / config.target_decode_tps - 1e-9)
    pressure = math.ceil(obs.prefill_miss_tps * factor / config.target_prefill_tps - 1e-9)
    asked = (max(math.ceil(decode * config.ratio[0] / config.ratio[1] - 1e-9), pressure), decode)
    ready_d = len(obs.of(Role.DECODE, *_READY))
    if (
        tier == 0
        and ready_d
        and abs(obs.decode_tps / (ready_d * config.target_decode_tps) - 1) <= config.dead_band
    ):
        decode = current[1]  # within the dead band of the capacity there is: no change
    if tier:  # an SLO is breached: capacity may grow, never shrink
        decode = max(decode, current[1])
        pressure = max(pressure, current[0])
    wanted = pools(decode, pressure, config)
    over, under = state.over_ticks, state.under_ticks
    if wanted == current:
        over = under = 0
    elif wanted[0] < current[0] or wanted[1] < current[1]:
        if wanted[0] > current[0] or wanted[1] > current[1]:  # one grows, the other shrinks: growth first
            over, under = over + 1, 0
        else:
            over, under = 0, under + 1
    else:
        over, under = over + 1, 0
    due = over >= config.out_ticks if over else under >= config.in_ticks
    target = wanted if due and wanted != current else current
    if target != current:  # acting now: count afresh
        over = under = 0
    new_state = ScaleState(over, under, state.decisions + 1)
    surplus = (max(0, current[0] - wanted[0]), max(0, current[1] - wanted[1]))
    plan = _Plan(obs, config, now, current, surplus)
    reason = plan.reach(target, tier)
    held = pools(asked[1], asked[0], config)
    if reason is ScaleReason.STEADY and wanted != current:
        reason = ScaleReason.WAITING_OUT if over else ScaleReason.WAITING_IN
    elif reason is ScaleReason.STEADY and (held[0] < asked[0] or held[1] < asked[1]):
        reason = ScaleReason.BUDGET  # the bounds or the budget hold back what the load asks for
    elif reason is ScaleReason.SCALE_OUT and tier:
        reason = ScaleReason.LATENCY
    elif reason is ScaleReason.SCALE_OUT and plan.grew[0] and not plan.grew[1] and pressure >= target[0]:
        reason = ScaleReason.PREFILL_PRESSURE
    detail = (
        f"decode {obs.decode_tps:.0f} tok/s (target {config.target_decode_tps:g} per instance), "
        f"cache-miss prefill {obs.prefill_miss_tps:.0f} tok/s (target {config.target_prefill_tps:g}), "
        f"latency tier {tier}; asked {asked[0]}P+{asked[1]}D, allowed {wanted[0]}P+{wanted[1]}D, "
        f"had {current[0]}P+{current[1]}D, now {plan.final[0]}P+{plan.final[1]}D"
    )
    decision = ScaleDecision(
        new_state.decisions,
        plan.final[0],
        plan.final[1],
        reason,
        detail,
        obs,
        tuple(plan.victims),
        tuple(plan.restore),
        tuple(plan.flips),
        tuple(plan.cancel),
        tuple(plan.remove),
    )
    return decision, new_state


class _Plan:
    """The moves from the current pools to the targets (the scratch work of one ``step``)."""

    def __init__(
        self,
        obs: ScaleObservation,
        config: AutoscalerConfig,
        now: float,
        current: tuple[int, int],
        surplus: tuple[int, int],
    ) -> None:
        self.obs, self.config, self.now = obs, config, now
        self.final = list(current)
        self.surplus = list(surplus)  # ready instances a pool could give up now (it asks for fewer)
        self.grew = [False, False]
        self.victims: list[str] = []
        self.restore: list[str] = []
        self.flips: list[tuple[str, Role]] = []
        self.cancel: list[str] = []
        self.remove: list[str] = []
        self._used: set[str] = set()

    def reach(self, target: tuple[int, int], tier: int) -> ScaleReason:
        reasons: list[ScaleReason] = []
        if tier:  # an SLO regressed: every instance on its way out goes back first
            for k, role in enumerate(_ROLES):
                for inst in self.obs.of(role, *_LEAVING):
                    self._put_back(k, inst)
            if self.restore:
                reasons.append(ScaleReason.RESTORE_WARM)
        for k, role in enumerate(_ROLES):
            if target[k] > self.final[k]:
                self._grow(k, role, target[k])
                reasons.append(ScaleReason.SCALE_OUT)
        if target[1] < self.final[1] and not self.grew[1]:  # the decode pool first: the prefill one follows
            coming = self.obs.of(Role.DECODE, *_COMING)  # cancelled at once; ready ones go one at a time
            reasons.append(
                self._shrink(1, Role.DECODE, target[1] if coming else max(target[1], self.final[1] - 1))
            )
        if (
            target[0] < self.final[0]
            and not self.grew[0]
            and ScaleReason.REFUSED_CONSOLIDATION not in reasons
        ):
            p, d = self.config.ratio
            follows = max(target[0], math.ceil(self.final[1] * p / d - 1e-9))  # one decode step's worth
            if follows < self.final[0]:
                reasons.append(self._shrink(0, Role.PREFILL, follows))
        for role in _ROLES:
            for inst in self.obs.of(role, InstanceState.WARM):
                if inst.instance_id not in self._used and self.now - inst.since >= self.config.warm_s:
                    self.remove.append(inst.instance_id)
        if self.remove and not reasons:
            reasons.append(ScaleReason.REMOVE_WARM)
        return reasons[0] if reasons else ScaleReason.STEADY

    def _grow(self, k: int, role: Role, target: int) -> None:
        """Put back this pool's leaving instances; restart the other pool's idle ones in this role, then
        (while it has a surplus the consolidation check allows) its least loaded ready ones; start new
        ones for the rest."""
        j, other = 1 - k, _ROLES[1 - k]
        for inst in self.obs.of(role, *_LEAVING):
            if self.final[k] >= target:
                return
            self._put_back(k, inst)
        for inst in self.obs.of(other, *_IDLE):
            if self.final[k] >= target:
                return
            if inst.instance_id not in self._used:
                self._flip(k, role, inst)
        ready = sorted(self.obs.of(other, *_READY), key=lambda i: (i.load, i.kv_blocks_used, i.instance_id))
        for inst in ready:
            if (
                self.final[k] >= target
                or self.surplus[j] <= 0
                or not self._survivors_cope(other, self.final[j])
            ):
                break
            self._flip(k, role, inst)
            self.final[j] -= 1
            self.surplus[j] -= 1
        if self.final[k] < target:
            self.final[k] = target
            self.grew[k] = True

    def _put_back(self, k: int, inst: InstanceView) -> None:
        self._used.add(inst.instance_id)
        self.restore.append(inst.instance_id)
        self.final[k] += 1
        self.grew[k] = True

    def _flip(self, k: int, role: Role, inst: InstanceView) -> None:
        self._used.add(inst.instance_id)
        self.flips.append((inst.instance_id, role))
        self.final[k] += 1
        self.grew[k] = True

    def _shrink(self, k: int, role: Role, target: int) -> ScaleReason:
        """Down to ``target``: instances still on their way are cancelled first, newest first (never a
        scale-in while some are pending); then, if the survivors cope, the least loaded ready ones go."""
        coming = self.obs.of(role, *_COMING)
        if coming:
            for inst in sorted(coming, key=lambda i: (-i.since, i.instance_id)):
                if self.final[k] <= target:
                    break
                self.cancel.append(inst.instance_id)
                self.final[k] -= 1
            return ScaleReason.CANCEL_PENDING
        ready = sorted(
            (i for i in self.obs.of(role, *_READY) if i.instance_id not in self._used),
            key=lambda i: (i.load, i.kv_blocks_used, i.instance_id),
        )
        if not self._survivors_cope(role, self.final[k], self.final[k] - target):
            return ScaleReason.REFUSED_CONSOLIDATION
        for victim in ready[: self.final[k] - target]:
            self._used.add(victim.instance_id)
            self.victims.append(victim.instance_id)
        self.final[k] = target
        return ScaleReason.SCALE_IN

    def _survivors_cope(self, role: Role, n: int, leaving: int = 1) -> bool:
        """The consolidation check: the load of ``n`` ready instances, carried by ``n - leaving``."""
        if n - leaving < 1:
            return False
        config, obs = self.config, self.obs
        if role is Role.DECODE:
            per_survivor, target = obs.decode_tps / (n - leaving), config.target_decode_tps
        else:
            per_survivor, target = obs.prefill_miss_tps / (n - leaving), config.target_prefill_tps
        if per_survivor >= target * config.consolidation_sensitivity:
            return False
        ready = obs.of(role, *_READY)
        used, total = sum(i.kv_blocks_used for i in ready), sum(i.kv_blocks_total for i in ready)
        return total == 0 or used / (total * (n - leaving) / n) <= config.kv_limit
