"""The instance lifecycle: one enum, one transition table; illegal transitions raise.

An instance is asked for (PENDING: a pod or an actor that may not exist yet), starts its engine (STARTING)
and serves (READY). To take it out of service it is CORDONED (no new requests), DRAINING (its requests move
away), DRAINED (it holds none), then kept WARM for a while in case it is needed back, and TERMINATED. A
drained or warm instance may also start again in the other role (a role switch: back to STARTING). DEAD is an
instance that failed or stopped reporting. Only READY instances are supply; cordoned, draining, drained and
warm ones count as neither supply nor load; pending and starting ones are capacity on its way.
"""

from __future__ import annotations

import enum


class InstanceState(enum.StrEnum):
    PENDING = "PENDING"
    STARTING = "STARTING"
    READY = "READY"
    CORDONED = "CORDONED"  # alive, takes no new requests
    DRAINING = "DRAINING"  # its running requests are moving away
    DRAINED = "DRAINED"  # it holds nothing
    WARM = "WARM"  # drained and kept, to be put back at once if needed
    DEAD = "DEAD"  # failed or stopped reporting; gets no work
    TERMINATED = "TERMINATED"  # gone for good

    @property
    def schedulable(self) -> bool:
        """Takes new requests."""
        return self is InstanceState.READY

    @property
    def on_its_way(self) -> bool:
        """Capacity asked for and not serving yet."""
        return self in (InstanceState.PENDING, InstanceState.STARTING)

    @property
    def out_of_service(self) -> bool:
        """Alive but neither supply nor load: leaving, or kept warm."""
        return self in (
            InstanceState.CORDONED,
            InstanceState.DRAINING,
            InstanceState.DRAINED,
            InstanceState.WARM,
        )


S = InstanceState
TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    S.PENDING: frozenset({S.STARTING, S.TERMINATED, S.DEAD}),
    S.STARTING: frozenset({S.READY, S.TERMINATED, S.DEAD}),
    S.READY: frozenset({S.CORDONED, S.TERMINATED, S.DEAD}),
    S.CORDONED: frozenset({S.READY, S.DRAINING, S.TERMINATED, S.DEAD}),
    S.DRAINING: frozenset({S.READY, S.DRAINED, S.DEAD}),
    S.DRAINED: frozenset({S.READY, S.WARM, S.STARTING, S.TERMINATED, S.DEAD}),
    S.WARM: frozenset({S.READY, S.STARTING, S.TERMINATED, S.DEAD}),
    S.DEAD: frozenset({S.TERMINATED}),
    S.TERMINATED: frozenset(),
}


class IllegalInstanceTransition(RuntimeError):
    def __init__(self, current: InstanceState, target: InstanceState) -> None:
        super().__init__(f"illegal instance transition {current.value} -> {target.value}")
        self.current = current
        self.target = target


def advance(current: InstanceState, target: InstanceState) -> InstanceState:
    """Return ``target`` if the table allows ``current -> target`` (or they are equal), else raise
    ``IllegalInstanceTransition``."""
    if target is not current and target not in TRANSITIONS[current]:
        raise IllegalInstanceTransition(current, target)
    return target
