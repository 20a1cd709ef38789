"""The actuator contract: how the controller's autoscaler loop sizes a pool, whatever runs it (Ray actors, a
Kubernetes Deployment or StatefulSet). One call, ``scale``, keyed by the decision it carries out and
idempotent; it names exactly which instances leave on a scale-in (drained victims, or instances still on
their way), and reports what happened. ``switch`` moves a drained instance to the other pool in place, where
the actuator can (``switches_in_place``); elsewhere a role switch is a removal and a start. Calls block (the
loop runs them off its event loop) and each carries its own deadline."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from protocol.snapshots import Role


class Outcome(enum.StrEnum):
    APPLIED = "applied"
    UNCHANGED = "unchanged"  # already applied (same decision), or nothing to do
    MANUAL_OVERRIDE = "manual_override"  # someone else sized the pool: held until an operator resumes it
    PENDING = "pending"  # an instance of the pool is still on its way: no scale-in now
    REFUSED = "refused"  # not instances this pool can remove
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Actuation:
    """What one call did, for the decision it carried out."""

    decision_id: str
    role: Role
    outcome: Outcome
    replicas_before: int
    replicas_after: int
    removed: tuple[str, ...] = ()
    detail: str = ""


@dataclass(frozen=True, slots=True)
class PoolMembers:
    """A pool as its actuator sees it: the replicas asked for, the instances that exist (ids as the workers
    report them), which of those are still on their way (not scheduled, or the engine not started), and why
    the pool is held, if it is."""

    replicas: int
    instances: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()
    hold: str = ""  # e.g. "manual_override: ..."; empty when the autoscaler may act


class Actuator(Protocol):
    @property
    def kind(self) -> str:
        """ "ray" or "kubernetes", for status lines."""
        ...

    @property
    def switches_in_place(self) -> bool:
        """Whether ``switch`` moves an instance between the pools without restarting it."""
        ...

    def members(self, role: Role) -> PoolMembers: ...

    def victim_order(self, role: Role, candidates: list[str]) -> list[str]:
        """Of ``candidates`` (ready instances), those this pool can remove, in its preferred order."""
        ...

    def scale(
        self,
        decision_id: str,
        role: Role,
        replicas: int,
        *,
        victims: tuple[str, ...] = (),
        cancel: tuple[str, ...] = (),
    ) -> Actuation:
        """Bring ``role``'s pool to ``replicas``: up by starting instances; down by removing exactly
        ``victims`` (drained) or ``cancel`` (on their way). The same decision again changes nothing."""
        ...

    def switch(self, decision_id: str, instance_id: str, role: Role) -> Actuation:
        """Move drained ``instance_id`` into ``role``'s pool without restarting it: APPLIED once it serves
        there, REFUSED where this actuator cannot, FAILED if the instance did not switch (it stays where it
        was). The same decision again changes nothing."""
        ...

    def resume(self, role: Role) -> PoolMembers:
        """After a manual override: the pool's current size is the autoscaler's again."""
        ...
