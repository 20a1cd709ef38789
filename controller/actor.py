"""The controller: one Ray actor, the single writer of cluster state. Workers push load snapshots to it;
it marks silent workers dead, pushes the cluster snapshot to every front door on a timer (no per-request
round trip), keeps the request log, coordinates migrations, and serves the admin gRPC API (as the
``AdminBackend`` the servicer is written against)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

from controller.admin_service import start_admin_server
from controller.autoscaling import AutoscalerLoop
from controller.draining import drain_instance
from controller.migrations import DrainResult, MigrationCoordinator, MigrationEntry
from controller.registry import InstanceRegistry
from controller.request_log import RequestLog
from policy.migration import MigrationTrigger
from protocol.actuation import Actuator
from protocol.auth import Credentials
from protocol.config import ClusterConfig
from protocol.errors import InvalidRequest
from protocol.lifecycle import RequestState
from protocol.messages import MigrationTarget
from protocol.migrations import MigrationReport
from protocol.snapshots import ClusterSnapshot, InstanceSnapshot, RequestEvent, RequestRecord
from runtime.actors import ActorDirectory, ActorGone

log = logging.getLogger(__name__)
_FRONTDOOR_CALL_S = 10.0


class _RayDecodeWorkers:
    """The coordinator's calls to decode workers, as Ray actors."""

    def __init__(self, actors: ActorDirectory) -> None:
        self.actors = actors

    async def migrate(
        self,
        worker: str,
        request_id: str,
        migration_id: str,
        target: MigrationTarget,
        mode: str,
        timeout_s: float,
    ) -> MigrationReport:
        report: MigrationReport = await self.actors.call(
            worker, "migrate", request_id, migration_id, target, mode, timeout_s=timeout_s
        )
        return report

    async def running_requests(self, worker: str, timeout_s: float) -> list[str]:
        running: list[str] = await self.actors.call(worker, "running_requests", timeout_s=timeout_s)
        return running


class _RayFrontDoors:
    """The autoscaler's calls to the front doors, as Ray actors (by name, each with a deadline)."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller

    async def publish(self) -> None:
        snapshot = self._controller.cluster_snapshot()
        await asyncio.gather(
            *(self._call(name, "update_snapshot", snapshot) for name in list(self._controller.frontdoors))
        )

    async def inbound(self, instance_id: str) -> int:
        async def one(name: str) -> int:
            try:
                return await self._call(name, "inbound", instance_id)
            except Exception as exc:  # it did not answer: it may still send there, so count one
                log.warning(
                    "front door %s did not say what it has on its way to %s: %s", name, instance_id, exc
                )
                return 1

        return sum(await asyncio.gather(*(one(name) for name in list(self._controller.frontdoors))))

    async def _call(self, name: str, method: str, *args: Any) -> int:
        try:
            result = await self._controller.actors.call(name, method, *args, timeout_s=_FRONTDOOR_CALL_S)
        except ActorGone:  # that front door is gone: nothing of it to wait for
            self._controller.frontdoors.pop(name, None)
            return 0
        return int(result or 0)


class Controller:
    def __init__(self, config: dict[str, Any], namespace: str) -> None:
        self.config = ClusterConfig.model_validate(config)
        self.registry = InstanceRegistry(
            self.config.controller.heartbeat_timeout_s, self.config.worker.start_timeout_s
        )
        self.requests = RequestLog(self.config.controller.request_history)
        self.actors = ActorDirectory(namespace)
        self.frontdoors: dict[str, dict[str, str]] = {}
        self._pushes: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._admin: Any = None
        self._autoscaler: AutoscalerLoop | None = None
        self.admin_port = 0
        self.migrations = MigrationCoordinator(
            self.registry, self.config.migration, _RayDecodeWorkers(self.actors), self._decoding_on
        )

    async def start(self, actuator: Actuator | None = None) -> int:
        """Start the admin server and the snapshot loop (and, given the actuator that sizes the pools, the
        autoscaler: it acts when ``autoscaler.enabled``, and takes manual targets either way); return the
        admin port."""
        self._admin, self.admin_port = await start_admin_server(
            self, self.config.controller.admin_host, self.config.controller.admin_port, Credentials.from_env()
        )
        self._tasks.append(asyncio.create_task(self._snapshot_loop()))
        if self.config.migration.auto:
            self._tasks.append(asyncio.create_task(self.migrations.policy_loop()))
        if actuator is not None:
            self._autoscaler = AutoscalerLoop(
                self.config, self.registry, self.requests, self.migrations, actuator, _RayFrontDoors(self)
            )
            self._tasks.append(asyncio.create_task(self._autoscaler.run()))
        return self.admin_port

    @property
    def autoscaler(self) -> AutoscalerLoop | None:
        return self._autoscaler

    async def report(self, snapshot: InstanceSnapshot) -> None:
        self.registry.report(snapshot, time.monotonic())

    def subscribe(self, actor_name: str, http_address: str, grpc_address: str) -> ClusterSnapshot:
        self.frontdoors[actor_name] = {"http": http_address, "grpc": grpc_address}
        self.actors.forget(actor_name)  # it may be a new actor under an old name (a restarted front door)
        self._pushes.pop(actor_name, None)
        return self.cluster_snapshot()

    def cluster_snapshot(self) -> ClusterSnapshot:
        scaling = self._autoscaler.totals() if self._autoscaler is not None else None
        return replace(
            self.registry.snapshot(time.time()),
            migrations=self.migrations.counters.totals(),
            autoscaler=scaling,
        )

    def frontdoor_addresses(self) -> dict[str, dict[str, str]]:
        return dict(self.frontdoors)

    def record_events(self, events: list[tuple[RequestEvent, int, int]]) -> None:
        for event, prompt_tokens, output_tokens in events:
            self.requests.apply(event, prompt_tokens, output_tokens)

    def list_requests(self, state: str = "", limit: int = 100, request_id: str = "") -> list[RequestRecord]:
        if request_id:
            record = self.requests.get(request_id)
            return [record] if record is not None else []
        return self.requests.list(state, limit)

    def ping(self) -> str:
        return "ok"

    # ---- the AdminBackend the admin servicer calls ----

    @property
    def model_name(self) -> str:
        return self.config.model.name

    def seconds_since_report(self, instance_id: str) -> float:
        return self.registry.seconds_since_report(instance_id, time.monotonic())

    def request_counts(self) -> dict[str, int]:
        return self.requests.counts()

    def migrations_in_flight(self) -> list[MigrationEntry]:
        return self.migrations.in_flight()

    def recent_migrations(self, limit: int) -> list[MigrationEntry]:
        return self.migrations.recent(limit)

    async def migrate(self, request_id: str, to_instance: str, mode: str) -> MigrationEntry:
        return await self.migrations.migrate(
            request_id, to_instance, mode=mode, trigger=MigrationTrigger.MANUAL
        )

    def cordon(self, instance_id: str) -> InstanceSnapshot:
        return self.migrations.cordon(instance_id)

    def uncordon(self, instance_id: str) -> InstanceSnapshot:
        return self.migrations.uncordon(instance_id)

    async def drain(self, instance_id: str, timeout_s: float) -> DrainResult:
        """Empty one worker of either role as a scale-in does (``controller.draining``); it stays cordoned."""
        inst = self.registry.snapshot(time.time()).by_id(instance_id)
        if inst is None:
            raise InvalidRequest(f"no instance {instance_id!r}", param="instance_id")
        return await drain_instance(
            instance_id,
            inst.role,
            registry=self.registry,
            migrations=self.migrations,
            frontdoors=_RayFrontDoors(self),
            timeout_s=timeout_s or self.config.migration.timeout_s * 4,
            clock=time.monotonic,
        )

    def _decoding_on(self, request_id: str) -> str | None:
        record = self.requests.get(request_id)
        if record is None or record.state not in (RequestState.DECODING, RequestState.MIGRATING):
            return None
        return record.decode_instance

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._admin is not None:
            await self._admin.stop(grace=1.0)

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.controller.snapshot_interval_s)
            try:
                await self._push_snapshot()
            except Exception:  # one bad round must not stop health checks and pushes for good
                log.exception("snapshot round failed")

    async def _push_snapshot(self) -> None:
        import ray

        for dead in self.registry.expire(time.monotonic()):
            log.warning("instance %s stopped reporting: marked DEAD", dead)
        snapshot = self.cluster_snapshot()
        for name in list(self.frontdoors):
            pending = self._pushes.get(name)
            if pending is not None and not ray.wait([pending], timeout=0)[0]:
                continue  # that front door has not taken the last one yet: send no backlog
            if pending is not None and _failed(pending):  # its actor died: look the name up again
                self.actors.forget(name)
            try:
                handle = await self.actors.handle(name)
            except (ActorGone, TimeoutError):  # that front door is gone
                self.frontdoors.pop(name, None)
                continue
            self._pushes[name] = handle.update_snapshot.remote(snapshot)


def _failed(ref: Any) -> bool:
    """Whether a finished call failed (its actor died)."""
    import ray

    try:
        ray.get(ref, timeout=0)
    except Exception:
        return True
    return False
