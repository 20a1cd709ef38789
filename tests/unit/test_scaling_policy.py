"""The autoscaling policy (``policy.scaling``), pure, against a toy cluster that carries out its decisions:
instances it asks for become ready a few ticks later, victims are drained and kept warm, flips restart in the
other role. No I/O, no clock but the ticks."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.scaling import (
    InstanceView,
    ScaleDecision,
    ScaleObservation,
    ScaleReason,
    ScaleState,
    step,
    within_budget,
)
from protocol.instances import InstanceState
from protocol.scaling_config import AutoscalerConfig
from protocol.snapshots import Role

S = InstanceState
TARGET = 100.0  # decode tokens/s per decode instance
CONFIG = AutoscalerConfig(
    target_decode_tps=TARGET, target_prefill_tps=1000.0, shape="1:2", out_ticks=2, in_ticks=4, warm_s=30.0,
    min_prefill=1, max_prefill=4, min_decode=1, max_decode=6, max_instances=10, max_accelerators=10,
)  # fmt: skip


@dataclass
class ToyCluster:
    """Carries out decisions: new instances are PENDING, then READY ``start_ticks`` later; victims go WARM
    (their drain is immediate here), flips are READY in their new role a tick later."""

    prefill: int = 1
    decode: int = 1
    start_ticks: int = 2
    now: float = 0.0
    instances: dict[str, InstanceView] = field(default_factory=dict)
    starting: dict[str, float] = field(default_factory=dict)  # id -> ready at
    ids: itertools.count = field(default_factory=itertools.count)  # type: ignore[type-arg]

    def __post_init__(self) -> None:
        for role, n in ((Role.PREFILL, self.prefill), (Role.DECODE, self.decode)):
            for _ in range(n):
                self._add(role, S.READY)

    def _add(self, role: Role, state: InstanceState) -> str:
        iid = f"{role.value}-{next(self.ids)}"
        self.instances[iid] = InstanceView(iid, role, state, kv_blocks_total=100, since=self.now)
        return iid

    def observe(
        self, decode_tps: float, *, miss_tps: float = 0.0, kv: float = 0.3, **latency: float
    ) -> ScaleObservation:
        ready_d = [i for i in self.instances.values() if i.role is Role.DECODE and i.state is S.READY]
        for iid, inst in list(self.instances.items()):  # the load spreads over the ready decode instances
            if inst.role is Role.DECODE and inst.state is S.READY:
                share = decode_tps / max(len(ready_d), 1)
                self.instances[iid] = replace(inst, load=int(share), kv_blocks_used=int(kv * 100))
        return ScaleObservation(decode_tps, miss_tps, instances=tuple(self.instances.values()), **latency)

    def count(self, role: Role, *states: InstanceState) -> int:
        states = states or (S.READY, S.PENDING, S.STARTING)
        return sum(1 for i in self.instances.values() if i.role is role and i.state in states)

    def apply(self, d: ScaleDecision) -> None:
        for iid in d.cancel + d.remove:
            del self.instances[iid]
        for iid in d.victims:
            self._move(iid, S.WARM)
        for iid in d.restore:
            self._move(iid, S.READY)
        for iid, role in d.flips:
            self.instances[iid] = replace(self.instances[iid], role=role, state=S.STARTING, since=self.now)
            self.starting[iid] = self.now + 1
        for role, want in ((Role.PREFILL, d.prefill), (Role.DECODE, d.decode)):
            for _ in range(want - self.count(role)):
                iid = self._add(role, S.PENDING)
                self.starting[iid] = self.now + self.start_ticks

    def tick(self) -> None:
        self.now += 1
        for iid, at in list(self.starting.items()):
            if at <= self.now and iid in self.instances:
                self._move(iid, S.READY)
                del self.starting[iid]

    def _move(self, iid: str, state: InstanceState) -> None:
        self.instances[iid] = replace(self.instances[iid], state=state, since=self.now)


def run(
    cluster: ToyCluster, loads: list[float], config: AutoscalerConfig = CONFIG, **obs: float
) -> list[ScaleDecision]:
    state, decisions = ScaleState(), []
    for load in loads:
        decision, state = step(cluster.observe(load, **obs), state, cluster.now, config)
        cluster.apply(decision)
        decisions.append(decision)
        cluster.tick()
    return decisions


def test_the_two_to_one_oscillation_holds_instead_of_flapping() -> None:
    """Dynamo's production case: two decode instances whose load one alone could not carry under its SLO
    (0.85 of a target, over the 0.8 sensitivity). The policy wants one, but refuses to consolidate, and holds
    at two for as long as the load stays; it never goes 2 -> 1 -> 2."""
    cluster = ToyCluster(prefill=1, decode=2)
    decisions = run(cluster, [85.0] * 40)
    assert {d.decode for d in decisions} == {2}
    assert decisions[-1].reason is ScaleReason.REFUSED_CONSOLIDATION and not any(d.victims for d in decisions)
    # the same with light traffic but full KV caches: the survivor could not hold the other's KV
    cluster = ToyCluster(prefill=1, decode=2)
    decisions = run(cluster, [30.0] * 20, kv=0.7)
    assert {d.decode for d in decisions} == {2} and decisions[-1].reason is ScaleReason.REFUSED_CONSOLIDATION


def test_a_noisy_ramp_scales_out_as_it_rises_and_in_late_one_at_a_time() -> None:
    rng = random.Random(7)
    ramp = (
        [50 + 30 * t for t in range(16)] + [480] * 8 + [max(20, 480 - 40 * t) for t in range(12)] + [20] * 40
    )
    loads = [x * rng.uniform(0.95, 1.05) for x in ramp]
    cluster = ToyCluster(prefill=1, decode=1)
    decisions = run(cluster, loads)
    rising = [d.decode for d in decisions[:24]]
    assert rising == sorted(rising), "the decode pool only grows while the load rises"
    assert max(rising) == 5  # 480 tok/s over 100 per instance (4 would be 1.2x: out of the dead band)
    falling = [d.decode for d in decisions[24:]]
    first_in = next(i for i, d in enumerate(decisions[24:]) if d.reason is ScaleReason.SCALE_IN)
    assert first_in >= CONFIG.in_ticks - 1, "in, only after in_ticks ticks asking for it"
    assert all(a - b in (0, 1) for a, b in itertools.pairwise(falling)), "in, one instance at a time"
    ins = [i for i, d in enumerate(decisions) if d.decode < decisions[i - 1].decode]
    assert all(b - a >= CONFIG.in_ticks for a, b in itertools.pairwise(ins)), "in_ticks between two"
    assert falling[-1] == 1 and all(d.decode >= 1 for d in decisions)


def _config(
    shape: str, bounds: tuple[int, int, int, int], budget: tuple[int, int, int, int]
) -> AutoscalerConfig:
    min_p, extra_p, min_d, extra_d = bounds
    return CONFIG.model_copy(
        update={
            "shape": shape, "min_prefill": min_p, "max_prefill": min_p + extra_p, "min_decode": min_d,
            "max_decode": min_d + extra_d, "max_instances": max(budget[0], min_p + min_d),
            "max_accelerators": max(budget[1], min_p * budget[2] + min_d * budget[3]),
            "accelerators_per_prefill": budget[2], "accelerators_per_decode": budget[3], "out_ticks": 1,
        }
    )  # fmt: skip


SERIES = st.lists(st.floats(0, 2000), min_size=1, max_size=40)
SHAPES = st.sampled_from(["1:1", "1:2", "1:3", "2:1", "3:4"])
BOUNDS = st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(0, 3), st.integers(0, 6))
BUDGETS = st.tuples(st.integers(1, 10), st.integers(1, 20), st.integers(1, 4), st.integers(1, 4))


@settings(max_examples=80, deadline=None)
@given(loads=SERIES, miss=st.floats(0, 20000), shape=SHAPES, bounds=BOUNDS, budget=BUDGETS)
def test_targets_never_leave_the_bounds_nor_the_budget(
    loads: list[float], miss: float, shape: str, bounds: tuple[int, int, int, int], budget: tuple[int, ...]
) -> None:
    config = _config(shape, bounds, budget)  # type: ignore[arg-type]
    cluster = ToyCluster(prefill=config.min_prefill, decode=config.min_decode, start_ticks=1)
    for decision in run(cluster, loads, config, miss_tps=miss):
        assert config.min_prefill <= decision.prefill <= config.max_prefill
        assert config.min_decode <= decision.decode <= config.max_decode
        assert decision.prefill + decision.decode <= config.max_instances
        accelerators = decision.prefill * budget[2] + decision.decode * budget[3]
        assert accelerators <= config.max_accelerators


@settings(max_examples=80, deadline=None)
@given(loads=SERIES, shape=SHAPES, bounds=BOUNDS, budget=BUDGETS)
def test_the_shape_holds_at_every_step(
    loads: list[float], shape: str, bounds: tuple[int, int, int, int], budget: tuple[int, ...]
) -> None:
    """Every decision's prefill pool is the decode pool's share by the shape, rounded up, within the prefill
    bounds; only the budget may hold it lower (never a mix such as 9P:4D from rounding each pool alone)."""
    config = _config(shape, bounds, budget)  # type: ignore[arg-type]
    cluster = ToyCluster(prefill=config.min_prefill, decode=config.min_decode, start_ticks=1)
    p, d = config.ratio
    for decision in run(cluster, loads, config):
        shaped = min(max(math.ceil(decision.decode * p / d), config.min_prefill), config.max_prefill)
        assert decision.prefill == shaped or (
            decision.prefill < shaped and not within_budget(shaped, decision.decode, config)
        ), (decision.prefill, decision.decode, decision.reason)


def test_the_shape_sets_the_prefill_pool_and_prefill_pressure_can_only_raise_it() -> None:
    cluster = ToyCluster(prefill=1, decode=1, start_ticks=1)
    decisions = run(cluster, [500.0] * 6)
    assert (decisions[-1].prefill, decisions[-1].decode) == (3, 5)  # 1:2 -> ceil(5 / 2)
    cluster = ToyCluster(prefill=1, decode=1, start_ticks=1)
    decisions = run(cluster, [90.0] * 6, miss_tps=3500.0)  # the prompts need 4 prefill instances
    assert (decisions[-1].prefill, decisions[-1].decode) == (4, 1)
    assert ScaleReason.PREFILL_PRESSURE in {d.reason for d in decisions}


def test_pending_instances_block_scale_in_and_are_cancelled_first_when_demand_falls() -> None:
    cluster = ToyCluster(prefill=1, decode=1, start_ticks=50)  # new instances stay pending
    decisions = run(cluster, [400.0] * 3)
    assert cluster.count(Role.DECODE, S.PENDING) == 3 and decisions[-1].decode == 4
    decisions = run(cluster, [40.0] * 6)  # demand collapses while they are pending
    cancelled = [iid for d in decisions for iid in d.cancel]
    assert sorted(i.split("-")[0] for i in cancelled) == ["decode"] * 3 + ["prefill"]  # 1:2 shape: 2P+4D
    assert not any(d.victims for d in decisions)
    assert {d.reason for d in decisions if d.cancel} == {ScaleReason.CANCEL_PENDING}
    assert cluster.count(Role.DECODE) == 1 and cluster.count(Role.DECODE, S.READY) == 1


def test_a_latency_breach_steps_capacity_up_in_tiers_and_never_down() -> None:
    cluster = ToyCluster(prefill=1, decode=2, start_ticks=1)
    # 190 tok/s on 2 instances: within the dead band without a breach
    assert {d.decode for d in run(cluster, [190.0] * 5)} == {2}
    moderate = run(cluster, [190.0] * 3, tpot_p99_s=CONFIG.tpot_slo_s * 1.2)  # +10%: 209 -> 3
    assert moderate[-1].decode == 3 and ScaleReason.LATENCY in {d.reason for d in moderate}
    severe = run(cluster, [240.0] * 3, ttft_p99_s=CONFIG.ttft_slo_s * 2)  # +20%: 288 -> 3; without: 3
    assert severe[-1].decode == 3
    severe = run(cluster, [260.0] * 3, ttft_p99_s=CONFIG.ttft_slo_s * 2)  # +20%: 312 -> 4
    assert severe[-1].decode == 4
    # a breach on a light load: it asks for more, never for less
    idle = run(ToyCluster(prefill=1, decode=3), [10.0] * 12, tpot_p99_s=CONFIG.tpot_slo_s * 3)
    assert all(d.decode >= 3 and not d.victims for d in idle)


def test_a_victim_is_the_least_loaded_is_kept_warm_put_back_on_an_slo_regression_and_removed_later() -> None:
    cluster = ToyCluster(prefill=1, decode=3)
    light = cluster.instances["decode-2"]
    decisions = run(cluster, [60.0] * 5)  # one instance would do; survivors carry 30 each
    (victim,) = [v for d in decisions for v in d.victims]
    assert cluster.instances[victim].state is S.WARM
    back = run(cluster, [60.0], tpot_p99_s=CONFIG.tpot_slo_s * 1.1)
    assert back[0].restore == (victim,) and back[0].reason is ScaleReason.RESTORE_WARM
    decisions = run(cluster, [60.0] * (CONFIG.in_ticks + int(CONFIG.warm_s) + 2))
    removed = [iid for d in decisions for iid in d.remove]
    assert removed and all(iid not in cluster.instances for iid in removed)
    assert light.instance_id  # the toy spreads load evenly: ties go by instance id


def test_a_pool_that_needs_more_takes_the_other_pool_s_spare_instance_instead_of_a_cold_start() -> None:
    """A prefill-heavy phase with decode capacity to spare: the policy restarts a decode instance as prefill
    (a role switch) rather than asking for a new one."""
    config = CONFIG.model_copy(update={"shape": "1:1", "max_instances": 4})
    cluster = ToyCluster(prefill=1, decode=3, start_ticks=1)
    decisions = run(cluster, [90.0] * 3, config, miss_tps=1800.0)  # prefill needs 2; decode needs 1 of 3
    flips = [f for d in decisions for f in d.flips]
    assert flips and flips[0][1] is Role.PREFILL and flips[0][0].startswith("decode")
    assert cluster.count(Role.PREFILL) == 2 and cluster.count(Role.DECODE) == 2


def test_the_same_inputs_give_the_same_decisions() -> None:
    loads = [50 + 30 * math.sin(t / 3) * t for t in range(60)]
    first = run(ToyCluster(), [abs(x) for x in loads], miss_tps=800.0)
    second = run(ToyCluster(), [abs(x) for x in loads], miss_tps=800.0)
    assert first == second


@pytest.mark.parametrize("shape", ["0:1", "1:0", "1-2", "a:b"])
def test_a_shape_that_is_not_p_colon_d_is_refused_by_name(shape: str) -> None:
    with pytest.raises(ValueError, match="shape must be 'p:d'"):
        AutoscalerConfig(shape=shape)
