"""pdflow.v1.Admin served from the controller actor (pdctl is its client)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protocol.proto import admin_pb2, admin_pb2_grpc
from protocol.snapshots import InstanceSnapshot, RequestRecord
from protocol.transfers import TransferRecord

if TYPE_CHECKING:
    from controller.controller import Controller


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
    def __init__(self, controller: Controller) -> None:
        self._c = controller

    def _instances(self, role: str = "") -> list[admin_pb2.Instance]:
        now = time.monotonic()
        return [
            instance_message(i, self._c.registry.seconds_since_report(i.instance_id, now))
            for i in self._c.cluster_snapshot().instances
            if not role or i.role.value == role
        ]

    async def GetClusterStatus(
        self, request: admin_pb2.ClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ClusterStatus:
        doors = list(self._c.frontdoor_addresses().values())
        return admin_pb2.ClusterStatus(
            model=self._c.config.model.name,
            instances=self._instances(),
            requests_by_state=self._c.requests.counts(),
            http_address=doors[0]["http"] if doors else "",
            grpc_address=doors[0]["grpc"] if doors else "",
            snapshot_version=self._c.cluster_snapshot().version,
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
            records = self._c.list_requests(request.state, request.limit or 100, request.request_id)
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown request state {request.state!r}")
        return admin_pb2.ListRequestsResponse(requests=[request_message(r) for r in records])


async def start_admin_server(controller: Controller, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(controller), server)
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
