"""The instance registry: the controller's one copy of what each worker last reported. A worker silent for
longer than the heartbeat timeout is marked DEAD and drops out of dispatch; one that last said it was
STARTING gets the engine's start deadline instead (loading an engine may starve its reports). Time is passed
in."""

from __future__ import annotations

from dataclasses import replace

from protocol.snapshots import ClusterSnapshot, InstanceSnapshot, InstanceState


class InstanceRegistry:
    def __init__(self, heartbeat_timeout_s: float, start_timeout_s: float = 300.0) -> None:
        self._timeout = heartbeat_timeout_s
        self._start_timeout = max(start_timeout_s, heartbeat_timeout_s)
        self._instances: dict[str, InstanceSnapshot] = {}
        self._heard_at: dict[str, float] = {}
        self._cordoned: set[str] = set()
        self._gone: set[str] = set()  # removed for good: a late report does not bring them back
        self._version = 0

    def report(self, snapshot: InstanceSnapshot, now: float) -> None:
        if snapshot.instance_id in self._gone:
            return
        before = self._instances.get(snapshot.instance_id)
        if before is not None and before.started_at != snapshot.started_at:
            # a new start under an old id: the cordon (a preStop drain's) was the old run's
            self._cordoned.discard(snapshot.instance_id)
        if snapshot.instance_id in self._cordoned and snapshot.state is InstanceState.READY:
            snapshot = replace(snapshot, state=InstanceState.CORDONED)
        self._instances[snapshot.instance_id] = snapshot
        self._heard_at[snapshot.instance_id] = now
        self._version += 1

    def cordon(self, instance_id: str) -> InstanceSnapshot:
        """No new requests for ``instance_id`` from the next snapshot on (it keeps what it runs). KeyError if
        unknown; a DEAD instance stays DEAD."""
        self._cordoned.add(instance_id)
        return self._set_state(instance_id, InstanceState.READY, InstanceState.CORDONED)

    def uncordon(self, instance_id: str) -> InstanceSnapshot:
        self._cordoned.discard(instance_id)
        return self._set_state(instance_id, InstanceState.CORDONED, InstanceState.READY)

    def _set_state(self, instance_id: str, old: InstanceState, new: InstanceState) -> InstanceSnapshot:
        current = self._instances[instance_id]
        if current.state is old:
            self._instances[instance_id] = replace(current, state=new)
            self._version += 1
        return self._instances[instance_id]

    def mark_dead(self, instance_id: str) -> None:
        current = self._instances.get(instance_id)
        if current is not None and current.state is not InstanceState.DEAD:
            self._instances[instance_id] = replace(current, state=InstanceState.DEAD)
            self._version += 1

    def forget(self, instance_id: str) -> None:
        """``instance_id`` was removed (a scale-in): drop it, and ignore its reports from now on."""
        self._gone.add(instance_id)
        self._cordoned.discard(instance_id)
        self._heard_at.pop(instance_id, None)
        if self._instances.pop(instance_id, None) is not None:
            self._version += 1

    def admit(self, instance_id: str) -> None:
        """An instance id may serve again (a new instance reuses the id of one removed before)."""
        self._gone.discard(instance_id)

    def expire(self, now: float) -> list[str]:
        """Mark every instance not heard from within the timeout DEAD; return the ones newly marked."""
        newly = [
            iid
            for iid, heard in self._heard_at.items()
            if now - heard > self._silence_allowed(self._instances[iid].state)
            and self._instances[iid].state is not InstanceState.DEAD
        ]
        for iid in newly:
            self.mark_dead(iid)
        return newly

    def _silence_allowed(self, state: InstanceState) -> float:
        return self._start_timeout if state is InstanceState.STARTING else self._timeout

    def heard_at(self, instance_id: str) -> float | None:
        """When (on the clock ``report`` is given) ``instance_id`` last reported; None if never."""
        return self._heard_at.get(instance_id)

    def seconds_since_report(self, instance_id: str, now: float) -> float:
        return now - self._heard_at.get(instance_id, now)

    def snapshot(self, now: float) -> ClusterSnapshot:
        instances = tuple(sorted(self._instances.values(), key=lambda i: (i.role.value, i.instance_id)))
        return ClusterSnapshot(version=self._version, instances=instances, taken_at=now)
