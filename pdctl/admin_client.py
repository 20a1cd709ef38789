"""A small client of pdflow.v1.Admin. Every call has a deadline and carries the admin token (by default from
``PDFLOW_ADMIN_TOKEN`` or ``PDFLOW_ADMIN_TOKEN_FILE``); failures become ``AdminUnavailable`` with a message a
person can act on."""

from __future__ import annotations

import grpc

from protocol.auth import ADMIN_TOKEN_ENV, admin_token_from_env
from protocol.proto import admin_pb2, admin_pb2_grpc

DEADLINE_S = 5.0
MIGRATION_DEADLINE_S = 90.0  # a migration's own deadline (migration.timeout_s) plus slack


class AdminUnavailable(RuntimeError):
    pass


class AdminClient:
    def __init__(self, address: str, token: str | None = None) -> None:
        self.address = address
        token = token if token is not None else admin_token_from_env()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channel = grpc.insecure_channel(address)
        self._stub = admin_pb2_grpc.AdminStub(self._channel)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()

    def status(self) -> admin_pb2.ClusterStatus:
        return self._call(self._stub.GetClusterStatus, admin_pb2.ClusterStatusRequest())

    def instances(self, role: str = "") -> admin_pb2.ListInstancesResponse:
        return self._call(self._stub.ListInstances, admin_pb2.ListInstancesRequest(role=role))

    def requests(
        self, state: str = "", limit: int = 50, request_id: str = ""
    ) -> admin_pb2.ListRequestsResponse:
        return self._call(
            self._stub.ListRequests,
            admin_pb2.ListRequestsRequest(state=state, limit=limit, request_id=request_id),
        )

    def migrate(self, request_id: str, to_instance: str = "", mode: str = "") -> admin_pb2.MigrationInfo:
        request = admin_pb2.MigrateRequest(request_id=request_id, to_instance=to_instance, mode=mode)
        return self._call(self._stub.Migrate, request, deadline_s=MIGRATION_DEADLINE_S)

    def cordon(self, instance_id: str) -> admin_pb2.Instance:
        return self._call(self._stub.Cordon, admin_pb2.InstanceRequest(instance_id=instance_id))

    def uncordon(self, instance_id: str) -> admin_pb2.Instance:
        return self._call(self._stub.Uncordon, admin_pb2.InstanceRequest(instance_id=instance_id))

    def drain(self, instance_id: str, timeout_s: float) -> admin_pb2.DrainResponse:
        request = admin_pb2.DrainRequest(instance_id=instance_id, timeout_seconds=timeout_s)
        return self._call(self._stub.Drain, request, deadline_s=timeout_s + 30.0)

    def migrations(self, limit: int = 20) -> admin_pb2.ListMigrationsResponse:
        return self._call(self._stub.ListMigrations, admin_pb2.ListMigrationsRequest(limit=limit))

    def autoscaler(self) -> admin_pb2.AutoscalerStatus:
        return self._call(self._stub.GetAutoscalerStatus, admin_pb2.AutoscalerStatusRequest())

    def autoscaler_decisions(self, limit: int, acting_only: bool) -> admin_pb2.ExplainAutoscalerResponse:
        request = admin_pb2.ExplainAutoscalerRequest(limit=limit, acting_only=acting_only)
        return self._call(self._stub.ExplainAutoscaler, request)

    def pause_autoscaler(self, reason: str) -> admin_pb2.AutoscalerStatus:
        return self._call(self._stub.PauseAutoscaler, admin_pb2.PauseAutoscalerRequest(reason=reason))

    def resume_autoscaler(self) -> admin_pb2.AutoscalerStatus:
        return self._call(self._stub.ResumeAutoscaler, admin_pb2.ResumeAutoscalerRequest(), deadline_s=30.0)

    def scale(self, prefill: int, decode: int, deadline_s: float) -> admin_pb2.ScaleDecisionInfo:
        request = admin_pb2.ScaleRequest(prefill=prefill, decode=decode)
        return self._call(self._stub.Scale, request, deadline_s=deadline_s)

    def set_role(self, instance_id: str, role: str, deadline_s: float) -> admin_pb2.ScaleDecisionInfo:
        request = admin_pb2.SetRoleRequest(instance_id=instance_id, role=role)
        return self._call(self._stub.SetRole, request, deadline_s=deadline_s)

    def _call(self, method, request, deadline_s: float = DEADLINE_S):  # type: ignore[no-untyped-def]
        try:
            return method(request, timeout=deadline_s, metadata=self._metadata)
        except grpc.RpcError as err:
            code = err.code()  # type: ignore[attr-defined]
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise AdminUnavailable(
                    f"no pdflow controller answers at {self.address} ({code.name}); is the cluster up? "
                    "Start one with `pdctl up`."
                ) from None
            if code is grpc.StatusCode.UNAUTHENTICATED:
                raise AdminUnavailable(
                    f"the controller at {self.address} refused the call: "
                    + (
                        f"{ADMIN_TOKEN_ENV} is not the cluster's admin token."
                        if self._metadata
                        else f"it needs the admin token; set {ADMIN_TOKEN_ENV} (or {ADMIN_TOKEN_ENV}_FILE)."
                    )
                ) from None
            raise AdminUnavailable(f"{code.name}: {err.details()}") from None  # type: ignore[attr-defined]
