"""What pdflow's gRPC servers (the front door's Router, the controller's Admin) check before a handler runs:
the caller's credential (the ``authorization`` metadata: a bearer key or token), and that the request parses
as its message. A call that fails either ends at once, UNAUTHENTICATED or INVALID_ARGUMENT, where gRPC's own
handling of an unparsable request would end it UNKNOWN, a server failure. The standard health service needs
no credential, for probes."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class GrpcGuard(grpc.aio.ServerInterceptor):
    """``allows(authorization)`` decides who may call (``protocol.auth.Credentials.allows_api`` or
    ``allows_admin``); ``what`` names the credential in the refusal, so that a client's user knows what to
    send."""

    def __init__(self, allows: Callable[[str | None], bool], what: str) -> None:
        self._allows = allows
        self._refusal = f"this call needs {what}: send the metadata 'authorization: Bearer <{what}>'"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        if not details.method.startswith(OPEN_PREFIXES):
            metadata = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}
            if not self._allows(metadata.get("authorization")):
                return _refusing(handler, self._refusal)
        return _parsing_first(handler, details.method)


def _codecs(handler: grpc.RpcMethodHandler) -> dict[str, Any]:
    return {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s shape that reads nothing and ends the call with UNAUTHENTICATED."""

    async def refuse(_: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    codecs = {**_codecs(handler), "request_deserializer": None}  # not even parsed
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **codecs)
    return grpc.stream_stream_rpc_method_handler(refuse, **codecs)


def _parsing_first(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """``handler`` taking its request as bytes and parsing it itself: INVALID_ARGUMENT if it does not parse.
    (Streamed requests are left to gRPC: no pdflow method takes one.)"""
    parse = handler.request_deserializer
    if parse is None or handler.request_streaming:
        return handler
    codecs = {**_codecs(handler), "request_deserializer": None}

    async def parsed(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return parse(raw)
        except Exception as exc:  # DecodeError, or invalid UTF-8 in a string field
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"{method}: the request does not parse: {exc}"
            )

    if handler.unary_unary:
        behaviour = handler.unary_unary

        async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            request = await parsed(raw, context)
            answer = behaviour(request, context)
            return await answer if inspect.isawaitable(answer) else answer

        return grpc.unary_unary_rpc_method_handler(unary, **codecs)
    streaming = handler.unary_stream
    if inspect.isasyncgenfunction(streaming):

        async def stream(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            request = await parsed(raw, context)
            async for answer in streaming(request, context):
                yield answer

        return grpc.unary_stream_rpc_method_handler(stream, **codecs)

    async def writing(raw: bytes, context: grpc.aio.ServicerContext) -> None:  # answers with context.write
        request = await parsed(raw, context)
        await streaming(request, context)

    return grpc.unary_stream_rpc_method_handler(writing, **codecs)
