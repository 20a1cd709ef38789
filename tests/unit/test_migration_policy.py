from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from policy.migration import (
    InFlightMigration,
    MigrationState,
    MigrationTrigger,
    RequestChoice,
    RunningRequest,
    decide,
    virtual_freeness,
)
from protocol.config import MigrationConfig
from protocol.ids import InstanceId, RequestId
from protocol.snapshots import ClusterSnapshot, InstanceSnapshot, InstanceState, Role

CFG = MigrationConfig(trigger_gap=5.0, headroom_blocks=20, max_concurrent=2, cooldown_s=10.0)


def tuned(**fields: object) -> MigrationConfig:
    return CFG.model_copy(update=fields)


def inst(
    iid: str,
    *,
    running: int = 0,
    waiting: int = 0,
    used: int = 0,
    total: int = 100,
    state=InstanceState.READY,
) -> InstanceSnapshot:
    return InstanceSnapshot(
        InstanceId(iid),
        Role.DECODE,
        state,
        f"pdflow-{iid}",
        num_running=running,
        num_waiting=waiting,
        kv_blocks_used=used,
        kv_blocks_total=total,
    )


def req(rid: str, iid: str, kv: int, copy: int | None = None, priority: int = 0) -> RunningRequest:
    return RunningRequest(RequestId(rid), InstanceId(iid), priority, kv, kv if copy is None else copy)


def snap(*instances: InstanceSnapshot) -> ClusterSnapshot:
    return ClusterSnapshot(1, instances)


def cluster(reqs: list[RunningRequest], total: int = 100, **states: InstanceState) -> ClusterSnapshot:
    """Decode instances consistent with ``reqs``: used blocks and batch follow from the requests."""
    ids = sorted({r.instance_id for r in reqs} | set(states))
    return snap(
        *(
            inst(
                i,
                running=sum(1 for r in reqs if r.instance_id == i),
                used=sum(r.kv_blocks for r in reqs if r.instance_id == i),
                total=total,
                state=states.get(i, InstanceState.READY),
            )
            for i in ids
        )
    )


def skewed() -> tuple[ClusterSnapshot, list[RunningRequest]]:
    reqs = [req("a", "d0", 20, copy=18), req("b", "d0", 30, copy=6), req("c", "d0", 25, copy=9)]
    return cluster(reqs, d1=InstanceState.READY), reqs


def test_balanced_cluster_plans_nothing() -> None:
    reqs = [req("a", "d0", 30), req("b", "d1", 32)]
    plan, _ = decide(cluster(reqs), reqs, MigrationState(), CFG, 0.0)
    assert plan.intents == ()


def test_skewed_cluster_moves_the_request_with_least_kv_to_copy_to_the_idle_instance() -> None:
    s, reqs = skewed()
    plan, state = decide(s, reqs, MigrationState(), CFG, 100.0)
    assert [(i.request_id, i.source, i.destination, i.trigger) for i in plan.intents] == [
        ("b", "d0", "d1", MigrationTrigger.LOAD_BALANCE)
    ]
    assert [m.request_id for m in state.in_flight] == ["b"]
    assert dict(state.last_migration) == {"d0": 100.0, "d1": 100.0}


def test_request_choice_is_configurable() -> None:
    s, reqs = skewed()
    most, _ = decide(s, reqs, MigrationState(), tuned(request_choice=RequestChoice.MOST_KV), 0.0)
    assert [i.request_id for i in most.intents] == ["b"]
    reqs = [replace(r, priority=1 if r.request_id != "c" else 0) for r in reqs]
    low, _ = decide(s, reqs, MigrationState(), tuned(request_choice=RequestChoice.LOWEST_PRIORITY), 0.0)
    assert [i.request_id for i in low.intents] == ["c"]


def test_a_move_that_would_not_shrink_the_gap_is_not_planned() -> None:
    # One huge request: moving it just swaps which instance is full.
    reqs = [req("big", "d0", 90)]
    s = cluster(reqs, d1=InstanceState.READY)
    plan, state = decide(s, reqs, MigrationState(), CFG, 0.0)
    assert plan.intents == () and state == MigrationState()


def test_draining_instance_is_emptied_up_to_the_limit_and_a_cordoned_one_never_receives() -> None:
    reqs = [req(f"r{k}", "d0", 5, copy=k) for k in range(4)] + [req("x", "d1", 60), req("y", "d2", 10)]
    s = cluster(reqs, d0=InstanceState.CORDONED, d1=InstanceState.CORDONED)
    draining = frozenset({InstanceId("d0")})
    plan, state = decide(s, reqs, MigrationState(), tuned(max_concurrent=3), 0.0, draining)
    assert all(i.trigger is MigrationTrigger.DRAIN for i in plan.intents)
    assert [(i.request_id, i.destination) for i in plan.intents] == [("r0", "d2"), ("r1", "d2"), ("r2", "d2")]
    assert len(state.in_flight) == 3
    # Next round, one finished: the drain goes on without a cooldown wait.
    done = [r for r in reqs if r.request_id not in {"r0"}]
    plan2, _ = decide(s, done, state.finished(RequestId("r0")), tuned(max_concurrent=3), 0.5, draining)
    assert [i.request_id for i in plan2.intents] == ["r3"]


def test_a_cordoned_instance_keeps_its_requests_and_takes_none() -> None:
    """``pdctl cordon`` only stops new work: it drains nothing, and no load-balancing move goes into it."""
    busy = [req(f"b{k}", "d1", 8) for k in range(8)]
    reqs = [req("c", "d0", 5), *busy]
    plan, _ = decide(cluster(reqs, d0=InstanceState.CORDONED), reqs, MigrationState(), CFG, 0.0)
    assert plan.intents == ()
    # With a worker that takes requests, the overloaded one sheds load there, never into the cordoned one.
    s2 = cluster(reqs, d0=InstanceState.CORDONED, d2=InstanceState.READY)
    plan2, _ = decide(s2, reqs, MigrationState(), CFG, 0.0)
    assert plan2.intents and all((i.source, i.destination) == ("d1", "d2") for i in plan2.intents)
    assert all(i.trigger is MigrationTrigger.LOAD_BALANCE for i in plan2.intents)


def test_no_request_moves_into_a_full_batch() -> None:
    """A destination running its engine's most requests at once would only queue a moved request."""
    reqs = [req(f"a{k}", "d0", 10) for k in range(6)] + [req(f"b{k}", "d1", 5) for k in range(2)]
    free = decide(cluster(reqs), reqs, MigrationState(), CFG, 0.0)[0]
    assert free.intents and all(i.destination == "d1" for i in free.intents)
    capped = snap(*(replace(i, max_batch=2) if i.instance_id == "d1" else i for i in cluster(reqs).instances))
    assert decide(capped, reqs, MigrationState(), CFG, 0.0)[0].intents == ()


def test_high_priority_headroom_makes_an_instance_look_fuller() -> None:
    reqs = [req(rid, "d0", 10) for rid in "abcd"] + [req(rid, "d1", 10) for rid in "efgh"]
    s, cfg = cluster(reqs), tuned(headroom_blocks=40)
    assert decide(s, reqs, MigrationState(), cfg, 0.0)[0].intents == ()
    vip = [replace(r, priority=2) if r.request_id == "a" else r for r in reqs]
    assert (
        virtual_freeness(s.instances[0], vip, cfg)
        == (100 - 40 - 40) / 4
        < virtual_freeness(s.instances[1], vip, cfg)
    )
    plan, _ = decide(s, vip, MigrationState(), cfg, 0.0)
    # The important request stays; an ordinary one makes room for its headroom.
    assert [(i.request_id, i.source, i.destination, i.trigger) for i in plan.intents] == [
        ("b", "d0", "d1", MigrationTrigger.PRIORITY)
    ]


def test_waiting_request_counts_as_head_of_line_demand() -> None:
    reqs = [req("a", "d0", 25)] + [req(x, "d0", 5) for x in "xyz"] + [req(x, "d1", 10) for x in "bcef"]
    s = snap(inst("d0", running=4, used=40), inst("d1", running=4, waiting=3, used=40))
    # Largest running request (25 blocks) stands in for the head of d1's queue.
    assert virtual_freeness(s.instances[1], reqs, CFG) == (100 - 40 - 25) / 4
    plan, _ = decide(s, reqs, MigrationState(), CFG, 0.0)
    assert [(i.request_id, i.source, i.trigger) for i in plan.intents] == [
        ("b", "d1", MigrationTrigger.DEFRAG)
    ]


def test_cooldown_and_in_flight_are_honoured_and_state_is_returned_not_mutated() -> None:
    s, reqs = skewed()
    state = MigrationState()
    plan, after = decide(s, reqs, state, CFG, 100.0)
    assert state == MigrationState() and len(plan.intents) == 1
    # The snapshot has not caught up yet: nothing new while both ends cool down and "b" is in flight.
    assert decide(s, reqs, after, CFG, 105.0)[0].intents == ()
    # Cooldown over, "b" still in flight: another request moves, never "b" twice.
    plan3, after3 = decide(s, reqs, after, CFG, 111.0)
    assert [i.request_id for i in plan3.intents] == ["c"]
    assert {m.request_id for m in after3.in_flight} == {"b", "c"}
    # "b" now runs on d1: its migration is over and leaves the in-flight set.
    moved = [replace(r, instance_id=InstanceId("d1")) if r.request_id == "b" else r for r in reqs]
    _, after4 = decide(s, moved, after3, CFG, 112.0)
    assert {m.request_id for m in after4.in_flight} == {"c"}


def test_in_flight_limit_blocks_new_moves() -> None:
    s, reqs = skewed()
    full = MigrationState(
        in_flight=tuple(
            InFlightMigration(RequestId(r), InstanceId("d0"), InstanceId("d9"), 0.0) for r in "ac"
        )
    )
    assert decide(s, reqs, full, CFG, 100.0)[0].intents == ()


def test_dead_instances_are_ignored() -> None:
    reqs = [req("a", "d0", 40), req("b", "d0", 40), req("z", "d1", 5)]
    s = cluster(reqs, d1=InstanceState.DEAD)
    assert decide(s, reqs, MigrationState(), CFG, 0.0)[0].intents == ()


def test_single_decode_instance_plans_nothing() -> None:
    s, reqs = skewed()
    one = snap(s.instances[0])
    assert decide(one, reqs, MigrationState(), CFG, 0.0)[0].intents == ()


def _apply(
    s: ClusterSnapshot, reqs: list[RunningRequest], rid: str, dst: str
) -> tuple[ClusterSnapshot, list[RunningRequest]]:
    moving = next(r for r in reqs if r.request_id == rid)

    def moved(i: InstanceSnapshot) -> InstanceSnapshot:
        if i.instance_id == moving.instance_id:
            return replace(
                i, num_running=i.num_running - 1, kv_blocks_used=i.kv_blocks_used - moving.kv_blocks
            )
        if i.instance_id == dst:
            return replace(
                i, num_running=i.num_running + 1, kv_blocks_used=i.kv_blocks_used + moving.kv_blocks
            )
        return i

    new_reqs = [replace(r, instance_id=InstanceId(dst)) if r is moving else r for r in reqs]
    return snap(*map(moved, s.instances)), new_reqs


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 2)), max_size=6), min_size=2, max_size=5),
    st.sampled_from(list(RequestChoice)),
    st.lists(st.booleans(), min_size=5, max_size=5),
)
def test_a_planned_move_always_strictly_lowers_the_freeness_spread(
    layout: list[list[tuple[int, int]]], choice: RequestChoice, waiting: list[bool]
) -> None:
    reqs = [
        req(f"r{n}-{k}", f"d{n}", kv, priority=p)
        for n, rs in enumerate(layout)
        for k, (kv, p) in enumerate(rs)
    ]
    s = snap(
        *(
            inst(f"d{n}", running=len(rs), waiting=int(waiting[n]), used=sum(kv for kv, _ in rs), total=250)
            for n, rs in enumerate(layout)
        )
    )
    cfg = tuned(request_choice=choice, max_concurrent=3)
    plan, _ = decide(s, reqs, MigrationState(), cfg, 0.0)
    for intent in plan.intents:
        assert intent.trigger is not MigrationTrigger.DRAIN
        before = {i.instance_id: virtual_freeness(i, reqs, cfg) for i in s.instances}
        s, reqs = _apply(s, reqs, intent.request_id, intent.destination)
        after = {i.instance_id: virtual_freeness(i, reqs, cfg) for i in s.instances}
        pair_before = before[intent.destination] - before[intent.source]
        pair_after = abs(after[intent.destination] - after[intent.source])
        assert pair_before > cfg.trigger_gap and pair_after < pair_before
        assert max(after.values()) - min(after.values()) <= max(before.values()) - min(before.values())
        if len(before) == 2:
            assert max(after.values()) - min(after.values()) < max(before.values()) - min(before.values())
