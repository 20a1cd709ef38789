"""pdflow.v1.Admin served from the controller actor (pdctl is its client). The servicer is written against
``AdminBackend``, the narrow view of the controller it needs, so it tests without a controller actor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controller.admin_autoscaler import decision_message, status_message
from controller.autoscaling import AutoscalerLoop
from controller.migrations import DrainResult, MigrationEntry
from protocol.auth import Credentials
from protocol.config import MigrationMode
from protocol.errors import InvalidRequest
from protocol.proto import admin_pb2, admin_pb2_grpc
from protocol.snapshots import ClusterSnapshot, InstanceSnapshot, RequestRecord, Role
from protocol.transfers import TransferRecord
from runtime.grpc_guard import GrpcGuard


class AdminBackend(Protocol):
    """What the admin API reads and asks of the cluster. Implemented by the controller actor."""

    @property
    def model_name(self) -> str: ...

    def cluster_snapshot(self) -> ClusterSnapshot: ...

    def seconds_since_report(self, instance_id: str) -> float: ...

    def request_counts(self) -> dict[str, int]: ...

    def frontdoor_addresses(self) -> dict[str, dict[str, str]]: ...

    def list_requests(self, state: str = "", limit: int = 100, request_id: str = "") -> list[RequestRecord]:
        """ValueError for an unknown state."""
        ...

    def migrations_in_flight(self) -> list[MigrationEntry]: ...

    def recent_migrations(self, limit: int) -> list[MigrationEntry]: ...

    async def migrate(self, request_id: str, to_instance: str, mode: str) -> MigrationEntry:
        """``InvalidRequest`` for a request or instance that cannot take part."""
        ...

    def cordon(self, instance_id: str) -> InstanceSnapshot: ...

    def uncordon(self, instance_id: str) -> InstanceSnapshot: ...

    async def drain(self, instance_id: str, timeout_s: float) -> DrainResult: ...

    @property
    def autoscaler(self) -> AutoscalerLoop | None:
        """The autoscaler loop; None when the cluster runs without one (no actuator)."""
        ...


def instance_message(inst: InstanceSnapshot, seconds_since_report: float) -> admin_pb2.Instance:
    t = inst.transfer
    return admin_pb2.Instance(
        instance_id=inst.instance_id,
        role=inst.role.value,
        state=inst.state.value,
        num_running=inst.num_running,
        num_waiting=inst.num_waiting,
        kv_blocks_used=inst.kv_blocks_used,
        kv_blocks_total=inst.kv_blocks_total,
        decode_tps=inst.decode_tps,
        prompt_tps=inst.prompt_tps,
        transfer=admin_pb2.TransferCounters(
            transfers=t.transfers,
            failed=t.failed,
            bytes=t.bytes,
            seconds=t.seconds,
            external_tokens=t.external_tokens,
        ),
        seconds_since_report=seconds_since_report,
    )


def request_message(record: RequestRecord) -> admin_pb2.RequestInfo:
    return admin_pb2.RequestInfo(
        request_id=record.request_id,
        state=record.state.value,
        prefill_instance=record.prefill_instance or "",
        decode_instance=record.decode_instance or "",
        prompt_tokens=record.prompt_tokens,
        output_tokens=record.output_tokens,
        events=[admin_pb2.RequestEvent(state=e.state.value, at=e.at, detail=e.detail) for e in record.events],
        transfer=_transfer(record.transfer) if record.transfer is not None else None,
    )


def _transfer(t: TransferRecord) -> admin_pb2.TransferInfo:
    return admin_pb2.TransferInfo(
        transfer_id=t.transfer_id,
        codec=t.codec,
        reason=t.reason,
        raw_bytes=t.raw_bytes,
        wire_bytes=t.wire_bytes,
        encode_seconds=t.encode_s,
        wire_seconds=t.wire_s,
        tail_seconds=t.tail_s,
        decode_seconds=t.decode_s,
        outcome=t.outcome.value,
        error=t.error,
        retries=t.retries,
        layers=t.layers,
        tokens=t.tokens,
    )


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, backend: AdminBackend) -> None:
        self._backend = backend

    def _instances(self, role: str = "") -> list[admin_pb2.Instance]:
        return [
            instance_message(i, self._backend.seconds_since_report(i.instance_id))
            for i in self._backend.cluster_snapshot().instances
            if not role or i.role.value == role
        ]

    async def GetClusterStatus(
        self, request: admin_pb2.ClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ClusterStatus:
        doors = list(self._backend.frontdoor_addresses().values())
        return admin_pb2.ClusterStatus(
            model=self._backend.model_name,
            instances=self._instances(),
            requests_by_state=self._backend.request_counts(),
            http_address=doors[0]["http"] if doors else "",
            grpc_address=doors[0]["grpc"] if doors else "",
            snapshot_version=self._backend.cluster_snapshot().version,
            migrations_in_flight=[migration_message(e) for e in self._backend.migrations_in_flight()],
        )

    async def ListInstances(
        self, request: admin_pb2.ListInstancesRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListInstancesResponse:
        if request.role not in ("", "prefill", "decode"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"role must be 'prefill', 'decode' or empty, not {request.role!r}",
            )
        return admin_pb2.ListInstancesResponse(instances=self._instances(request.role))

    async def ListRequests(
        self, request: admin_pb2.ListRequestsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListRequestsResponse:
        try:
            records = self._backend.list_requests(request.state, request.limit or 100, request.request_id)
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown request state {request.state!r}")
        return admin_pb2.ListRequestsResponse(requests=[request_message(r) for r in records])

    async def Migrate(
        self, request: admin_pb2.MigrateRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.MigrationInfo:
        if request.mode and request.mode not in {m.value for m in MigrationMode}:
            modes = ", ".join(m.value for m in MigrationMode)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"mode must be one of {modes}")
        try:
            entry = await self._backend.migrate(request.request_id, request.to_instance, request.mode)
        except InvalidRequest as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err.message)
        return migration_message(entry)

    async def Cordon(
        self, request: admin_pb2.InstanceRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Instance:
        return await self._on_instance(request.instance_id, self._backend.cordon, context)

    async def Uncordon(
        self, request: admin_pb2.InstanceRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.Instance:
        return await self._on_instance(request.instance_id, self._backend.uncordon, context)

    async def Drain(
        self, request: admin_pb2.DrainRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DrainResponse:
        try:
            result = await self._backend.drain(request.instance_id, request.timeout_seconds)
        except InvalidRequest as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err.message)
        return admin_pb2.DrainResponse(
            moved=result.moved,
            failed=result.failed,
            finished=result.finished,
            remaining=result.remaining,
            seconds=result.seconds,
            migrations=[migration_message(e) for e in result.migrations],
        )

    async def ListMigrations(
        self, request: admin_pb2.ListMigrationsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListMigrationsResponse:
        return admin_pb2.ListMigrationsResponse(
            in_flight=[migration_message(e) for e in self._backend.migrations_in_flight()],
            recent=[migration_message(e) for e in self._backend.recent_migrations(request.limit or 50)],
        )

    async def GetAutoscalerStatus(
        self, request: admin_pb2.AutoscalerStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AutoscalerStatus:
        return status_message((await self._autoscaler(context)).status())

    async def ExplainAutoscaler(
        self, request: admin_pb2.ExplainAutoscalerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ExplainAutoscalerResponse:
        if request.limit < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit must be 0 (the default) or more")
        loop = await self._autoscaler(context)
        records = list(reversed(loop.acted if request.acting_only else loop.history))
        return admin_pb2.ExplainAutoscalerResponse(
            decisions=[decision_message(r) for r in records[: request.limit or 20]]
        )

    async def PauseAutoscaler(
        self, request: admin_pb2.PauseAutoscalerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AutoscalerStatus:
        loop = await self._autoscaler(context)
        loop.pause(request.reason or "paused by an operator")
        return status_message(loop.status())

    async def ResumeAutoscaler(
        self, request: admin_pb2.ResumeAutoscalerRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.AutoscalerStatus:
        loop = await self._autoscaler(context)
        try:
            await loop.resume()
        except Exception as exc:  # the actuator did not answer
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"could not resume: {type(exc).__name__}: {exc}")
        return status_message(loop.status())

    async def Scale(
        self, request: admin_pb2.ScaleRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ScaleDecisionInfo:
        loop = await self._autoscaler(context)
        try:
            record = await loop.set_target(request.prefill, request.decode)
        except InvalidRequest as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err.message)
        except Exception as exc:  # the actuator did not answer before anything was done
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"could not scale: {type(exc).__name__}: {exc}")
        return decision_message(record)

    async def SetRole(
        self, request: admin_pb2.SetRoleRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ScaleDecisionInfo:
        loop = await self._autoscaler(context)
        if request.role not in ("prefill", "decode"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"role must be 'prefill' or 'decode', not {request.role!r}"
            )
        try:
            record = await loop.set_role(request.instance_id, Role(request.role))
        except InvalidRequest as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err.message)
        except Exception as exc:  # the actuator did not answer before anything was done
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"could not switch the role: {type(exc).__name__}: {exc}"
            )
        return decision_message(record)

    async def _autoscaler(self, context: grpc.aio.ServicerContext) -> AutoscalerLoop:
        loop = self._backend.autoscaler
        if loop is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this cluster runs no autoscaler: start it with `pdctl up --autoscale` "
                "(or autoscaler.enabled in the config)",
            )
        assert loop is not None
        return loop

    async def _on_instance(
        self, instance_id: str, action: Callable[[str], InstanceSnapshot], context: grpc.aio.ServicerContext
    ) -> admin_pb2.Instance:
        try:
            snapshot = action(instance_id)
        except InvalidRequest as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, err.message)
        return instance_message(snapshot, self._backend.seconds_since_report(instance_id))


def migration_message(entry: MigrationEntry) -> admin_pb2.MigrationInfo:
    info = admin_pb2.MigrationInfo(
        request_id=entry.request_id,
        migration_id=entry.migration_id,
        source=entry.source,
        destination=entry.destination,
        mode=entry.mode.value,
        trigger=str(entry.trigger),
        started_at=entry.started_at,
    )
    if (r := entry.report) is not None:
        info.outcome = r.outcome.value
        info.error = r.error
        info.stages = r.stages
        info.blocks = r.blocks
        info.wire_bytes = r.wire_bytes
        info.primed_blocks = r.primed_blocks
        info.tokens = r.tokens
        info.paused_seconds = r.paused_s
        info.duration_seconds = r.duration_s
    return info


async def start_admin_server(
    backend: AdminBackend, host: str, port: int, credentials: Credentials | None = None
) -> tuple[grpc.aio.Server, int]:
    """Serve pdflow.v1.Admin on ``host:port`` (0: a free one); with an admin token in ``credentials``, every
    call but health checks needs it (and without one, only loopback may be bound). Returns the server and its
    bound port."""
    credentials = credentials or Credentials()
    credentials.require_admin_token_for(host)  # CredentialError on an address others reach, without it
    allows = credentials.allows_admin
    server = grpc.aio.server(interceptors=[GrpcGuard(allows, "the admin token")])
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(backend), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_names = (
        admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
        reflection.SERVICE_NAME,
        health.SERVICE_NAME,
    )
    reflection.enable_server_reflection(service_names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for name in ("", service_names[0]):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
