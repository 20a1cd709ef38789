"""Dispatch: which (prefill, decode) pair takes a new request. Pure: the same function runs in the front
door, in tests and in the simulator. Least loaded means the prefill worker with the fewest requests and the
decode worker with the highest freeness (``policy.freeness``)."""

from __future__ import annotations

from dataclasses import dataclass

from policy.freeness import instance_freeness
from protocol.config import DispatchPolicyKind
from protocol.errors import PoolEmpty
from protocol.snapshots import ClusterSnapshot, InstanceSnapshot, Role

# A placement the instance has not reported yet is counted as load for at most this long.
_PLACEMENT_MEMORY_S = 10.0


@dataclass(frozen=True, slots=True)
class DispatchPlan:
    prefill: InstanceSnapshot
    decode: InstanceSnapshot


@dataclass(frozen=True, slots=True)
class DispatchState:
    """Round-robin cursors, and recent placements as (instance id, when). A placement counts as load on its
    instance until the instance reports after it, so a burst that arrives between two reports does not all
    land on the instance that looked idlest."""

    next_prefill: int = 0
    next_decode: int = 0
    placements: tuple[tuple[str, float], ...] = ()


def _unreported(state: DispatchState, snapshot: ClusterSnapshot, now: float) -> tuple[tuple[str, float], ...]:
    reported: dict[str, float] = {i.instance_id: i.reported_at for i in snapshot.instances}
    return tuple(
        (iid, at)
        for iid, at in state.placements
        if at > reported.get(iid, float("inf")) and now - at < _PLACEMENT_MEMORY_S
    )


def decide(
    snapshot: ClusterSnapshot, state: DispatchState, kind: DispatchPolicyKind, now: float
) -> tuple[DispatchPlan, DispatchState]:
    """Pick the pair. ``now`` is on the clock of the instances' ``reported_at``. Raises ``PoolEmpty``."""
    prefills = sorted(snapshot.live(Role.PREFILL), key=lambda i: i.instance_id)
    decodes = sorted(snapshot.live(Role.DECODE), key=lambda i: i.instance_id)
    if not prefills:
        raise PoolEmpty("no prefill worker is alive: the prefill pool is empty")
    if not decodes:
        raise PoolEmpty("no decode worker is alive: the decode pool is empty")
    pending = _unreported(state, snapshot, now)
    extra: dict[str, int] = {}
    for iid, _ in pending:
        extra[iid] = extra.get(iid, 0) + 1
    if kind is DispatchPolicyKind.ROUND_ROBIN:
        prefill = prefills[state.next_prefill % len(prefills)]
        decode = decodes[state.next_decode % len(decodes)]
    else:
        prefill = min(
            prefills,
            key=lambda i: (i.load + extra.get(i.instance_id, 0), i.instance_id),
        )
        decode = max(
            decodes, key=lambda i: (instance_freeness(i, extra.get(i.instance_id, 0)), i.instance_id)
        )
    new_state = DispatchState(
        next_prefill=state.next_prefill + 1,
        next_decode=state.next_decode + 1,
        placements=(*pending, (prefill.instance_id, now), (decode.instance_id, now)),
    )
    return DispatchPlan(prefill, decode), new_state


def replacement(snapshot: ClusterSnapshot, role: Role, excluded: set[str]) -> InstanceSnapshot | None:
    """The live worker of ``role`` that takes over a request from a failed one (a prefill retried, a hand-off
    that did not land, a decode resumed): the least loaded outside ``excluded``; None if there is none."""
    others = [i for i in snapshot.live(role) if i.instance_id not in excluded]
    return min(others, key=lambda i: (i.load, i.instance_id)) if others else None
