"""Bearer authentication for pdflow's gRPC servers (the front door's Router, the controller's Admin): a
server interceptor that ends every call without an accepted ``authorization`` metadata value with
UNAUTHENTICATED before its handler runs. The standard health service stays open, for probes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class BearerInterceptor(grpc.aio.ServerInterceptor):
    """``allows(authorization)`` decides (``protocol.auth.Credentials.allows_api`` or ``allows_admin``);
    ``what`` names the credential in the refusal, so that a client's user knows what to send."""

    def __init__(self, allows: Callable[[str | None], bool], what: str) -> None:
        self._allows = allows
        self._refusal = f"this call needs {what}: send the metadata 'authorization: Bearer <{what}>'"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        metadata = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}
        if self._allows(metadata.get("authorization")):
            return handler
        return _refusing(handler, self._refusal)


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s shape that reads nothing and ends the call with UNAUTHENTICATED."""

    async def refuse(_: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **codecs)
    return grpc.stream_stream_rpc_method_handler(refuse, **codecs)
