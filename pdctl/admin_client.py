"""A small client of pdflow.v1.Admin. Every call has a deadline; failures become ``AdminUnavailable`` with a
message a person can act on."""

from __future__ import annotations

import grpc

from protocol.proto import admin_pb2, admin_pb2_grpc

DEADLINE_S = 5.0


class AdminUnavailable(RuntimeError):
    pass


class AdminClient:
    def __init__(self, address: str) -> None:
        self.address = address
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

    def _call(self, method, request):  # type: ignore[no-untyped-def]
        try:
            return method(request, timeout=DEADLINE_S)
        except grpc.RpcError as err:
            code = err.code()  # type: ignore[attr-defined]
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise AdminUnavailable(
                    f"no pdflow controller answers at {self.address} ({code.name}); is the cluster up? "
                    "Start one with `pdctl up`."
                ) from None
            raise AdminUnavailable(f"{code.name}: {err.details()}") from None  # type: ignore[attr-defined]
