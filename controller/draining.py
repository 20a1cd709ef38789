"""Emptying one instance before it leaves, whoever asks: the autoscaler's scale-in, ``pdctl drain`` and the
Kubernetes preStop hook (``pdctl pod drain``) all go through ``drain_instance``.

The instance is cordoned and every front door is sent the snapshot that says so (and answers), so nothing new
is sent to it; then a decode worker's running requests move by live migration (recompute as the last resort)
and a prefill worker's prompts are left to finish; either way the requests the front doors still have on
their way to it (prefilling for it, being handed over, migrating to it) are waited for, and moved once they
land."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from controller.migrations import DrainResult, MigrationCoordinator
from controller.registry import InstanceRegistry
from protocol.snapshots import InstanceState, Role

_SETTLE_POLL_S = 0.2


class FrontDoors(Protocol):
    async def publish(self) -> None:
        """Send every front door the current snapshot and wait until each has it (raises past a deadline)."""
        ...

    async def inbound(self, instance_id: str) -> int:
        """Requests the front doors have planned on ``instance_id`` that still need it (see
        ``RequestRouter.inbound``); a front door that does not answer counts as one."""
        ...


async def drain_instance(
    iid: str,
    role: Role,
    *,
    registry: InstanceRegistry,
    migrations: MigrationCoordinator,
    frontdoors: FrontDoors,
    timeout_s: float,
    clock: Callable[[], float],
) -> DrainResult:
    """Cordon ``iid``, tell every front door, then empty it within ``timeout_s``: ``remaining`` is what it
    still held or had coming when the time ran out (0: it is empty and stays cordoned). A DEAD instance
    holds nothing that could move (what ran there ended with it): it returns at once, uncordoned."""
    inst = registry.snapshot(0.0).by_id(iid)
    if inst is None or inst.state is InstanceState.DEAD:
        return DrainResult()
    registry.cordon(iid)
    await frontdoors.publish()

    async def inbound() -> int:
        return await frontdoors.inbound(iid)

    if role is Role.DECODE:
        return await migrations.drain(iid, timeout_s, inbound)
    return await _settle_prefill(iid, registry, inbound, timeout_s, clock)


async def _settle_prefill(
    iid: str,
    registry: InstanceRegistry,
    inbound: Callable[[], Awaitable[int]],
    timeout_s: float,
    clock: Callable[[], float],
) -> DrainResult:
    """A prefill worker is empty once no front door needs it and it has reported no load since."""
    started = clock()
    quiet_since: float | None = None  # since when no front door needs it
    coming = 0
    while clock() - started < timeout_s:
        coming = await inbound()
        if coming == 0:
            quiet_since = clock() if quiet_since is None else quiet_since
            heard = registry.heard_at(iid)
            inst = registry.snapshot(0.0).by_id(iid)
            if inst is None or (heard is not None and heard > quiet_since and inst.load == 0):
                return DrainResult(seconds=clock() - started)
        else:
            quiet_since = None
        await asyncio.sleep(_SETTLE_POLL_S)
    inst = registry.snapshot(0.0).by_id(iid)
    return DrainResult(remaining=max(coming, inst.load if inst else 0, 1), seconds=clock() - started)
