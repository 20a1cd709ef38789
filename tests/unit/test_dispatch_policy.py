from __future__ import annotations

from dataclasses import replace

import pytest

from policy.dispatch import DispatchState, decide
from policy.freeness import instance_freeness
from protocol.config import DispatchPolicyKind
from protocol.errors import PoolEmpty
from protocol.ids import InstanceId
from protocol.snapshots import ClusterSnapshot, InstanceSnapshot, InstanceState, Role


def inst(
    iid: str,
    role: Role,
    *,
    running: int = 0,
    waiting: int = 0,
    used: int = 0,
    total: int = 100,
    state: InstanceState = InstanceState.READY,
) -> InstanceSnapshot:
    return InstanceSnapshot(
        InstanceId(iid),
        role,
        state,
        f"pdflow-{iid}",
        num_running=running,
        num_waiting=waiting,
        kv_blocks_used=used,
        kv_blocks_total=total,
    )


def test_freeness_is_free_blocks_per_request() -> None:
    assert instance_freeness(inst("d", Role.DECODE, running=4, used=60)) == 10.0
    assert instance_freeness(inst("d", Role.DECODE, running=0, used=0)) == 100.0


def test_least_loaded_picks_the_freest_decode_and_the_shortest_prefill_queue() -> None:
    snap = ClusterSnapshot(
        1,
        (
            inst("prefill-0", Role.PREFILL, waiting=3),
            inst("prefill-1", Role.PREFILL),
            inst("decode-0", Role.DECODE, running=8, used=90),
            inst("decode-1", Role.DECODE, running=2, used=20),
        ),
    )
    plan, _ = decide(snap, DispatchState(), DispatchPolicyKind.LEAST_LOADED, 100.0)
    assert (plan.prefill.instance_id, plan.decode.instance_id) == ("prefill-1", "decode-1")


def test_a_burst_between_snapshots_spreads_over_equal_instances() -> None:
    snap = ClusterSnapshot(
        7, (inst("prefill-0", Role.PREFILL), inst("decode-0", Role.DECODE), inst("decode-1", Role.DECODE))
    )
    state = DispatchState()
    chosen = []
    for _ in range(4):
        plan, state = decide(snap, state, DispatchPolicyKind.LEAST_LOADED, 100.0)
        chosen.append(plan.decode.instance_id)
    assert sorted(chosen) == ["decode-0", "decode-0", "decode-1", "decode-1"]


def test_round_robin_cycles() -> None:
    snap = ClusterSnapshot(
        1, (inst("prefill-0", Role.PREFILL), inst("prefill-1", Role.PREFILL), inst("decode-0", Role.DECODE))
    )
    state = DispatchState()
    seen = []
    for _ in range(4):
        plan, state = decide(snap, state, DispatchPolicyKind.ROUND_ROBIN, 100.0)
        seen.append(plan.prefill.instance_id)
    assert seen == ["prefill-0", "prefill-1", "prefill-0", "prefill-1"]


def test_dead_and_cordoned_instances_get_no_work() -> None:
    snap = ClusterSnapshot(
        1,
        (
            inst("prefill-0", Role.PREFILL),
            inst("decode-0", Role.DECODE, state=InstanceState.DEAD),
            inst("decode-1", Role.DECODE, state=InstanceState.CORDONED, running=50),
        ),
    )
    with pytest.raises(PoolEmpty, match="decode pool is empty"):
        decide(snap, DispatchState(), DispatchPolicyKind.LEAST_LOADED, 100.0)


def test_empty_prefill_pool_is_named() -> None:
    with pytest.raises(PoolEmpty, match="prefill pool is empty"):
        decide(
            ClusterSnapshot(1, (inst("decode-0", Role.DECODE),)),
            DispatchState(),
            DispatchPolicyKind.ROUND_ROBIN,
            1.0,
        )


def test_placements_count_until_the_instance_reports_after_them() -> None:
    def snap(reported_at: float) -> ClusterSnapshot:
        return ClusterSnapshot(
            1,
            (
                replace(inst("prefill-0", Role.PREFILL), reported_at=reported_at),
                replace(inst("decode-0", Role.DECODE), reported_at=reported_at),
                replace(inst("decode-1", Role.DECODE, running=1, used=10), reported_at=reported_at),
            ),
        )

    # decode-0 is idle, decode-1 has one request: the first two go to decode-0 (freeness 100 and 100
    # against 90), the third to decode-1 (50 against 90)...
    state = DispatchState()
    first, state = decide(snap(10.0), state, DispatchPolicyKind.LEAST_LOADED, 11.0)
    second, state = decide(snap(10.0), state, DispatchPolicyKind.LEAST_LOADED, 11.1)
    third, state = decide(snap(10.0), state, DispatchPolicyKind.LEAST_LOADED, 11.2)
    assert [p.decode.instance_id for p in (first, second, third)] == ["decode-0", "decode-0", "decode-1"]
    # ...and once both report after those placements, the placements are no longer extra load.
    fourth, state = decide(snap(12.0), state, DispatchPolicyKind.LEAST_LOADED, 12.1)
    assert fourth.decode.instance_id == "decode-0"
    assert [iid for iid, _ in state.placements] == ["prefill-0", "decode-0"]
