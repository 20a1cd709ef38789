"""Dispatch: which (prefill, decode) pair takes a new request. Pure: the same function runs in the front
door, in tests and in the simulator."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.config import DispatchPolicyKind
from protocol.errors import PoolEmpty
from protocol.snapshots import ClusterSnapshot, InstanceSnapshot, Role


@dataclass(frozen=True, slots=True)
class DispatchPlan:
    prefill: InstanceSnapshot
    decode: InstanceSnapshot


@dataclass(frozen=True, slots=True)
class DispatchState:
    """Round-robin cursors, and the requests placed since the snapshot was taken (so that a burst between
    two snapshots does not all land on the instance that looked idlest)."""

    next_prefill: int = 0
    next_decode: int = 0
    placed_since_snapshot: tuple[tuple[str, int], ...] = ()
    snapshot_version: int = -1


def freeness(instance: InstanceSnapshot, extra_requests: int = 0) -> float:
    """Llumnix freeness: free KV blocks per running request. Higher means more room to grow."""
    batch = instance.num_running + instance.num_waiting + extra_requests
    free = instance.kv_blocks_total - instance.kv_blocks_used
    return free / max(batch, 1)


def decide(
    snapshot: ClusterSnapshot, state: DispatchState, kind: DispatchPolicyKind
) -> tuple[DispatchPlan, DispatchState]:
    prefills = sorted(snapshot.live(Role.PREFILL), key=lambda i: i.instance_id)
    decodes = sorted(snapshot.live(Role.DECODE), key=lambda i: i.instance_id)
    if not prefills:
        raise PoolEmpty("no prefill worker is alive: the prefill pool is empty")
    if not decodes:
        raise PoolEmpty("no decode worker is alive: the decode pool is empty")
    if state.snapshot_version != snapshot.version:
        state = DispatchState(state.next_prefill, state.next_decode, (), snapshot.version)
    if kind is DispatchPolicyKind.ROUND_ROBIN:
        prefill = prefills[state.next_prefill % len(prefills)]
        decode = decodes[state.next_decode % len(decodes)]
    else:
        placed = dict(state.placed_since_snapshot)
        prefill = min(
            prefills,
            key=lambda i: (i.num_waiting + i.num_running + placed.get(i.instance_id, 0), i.instance_id),
        )
        decode = max(decodes, key=lambda i: (freeness(i, placed.get(i.instance_id, 0)), i.instance_id))
    placed = dict(state.placed_since_snapshot)
    for chosen in (prefill, decode):
        placed[chosen.instance_id] = placed.get(chosen.instance_id, 0) + 1
    new_state = DispatchState(
        next_prefill=state.next_prefill + 1,
        next_decode=state.next_decode + 1,
        placed_since_snapshot=tuple(sorted(placed.items())),
        snapshot_version=snapshot.version,
    )
    return DispatchPlan(prefill, decode), new_state
