"""The gRPC routing API of the front door (``pdflow.v1.Router``) and its server.

``Generate`` streams ``GenerateResponse``s: token ids with the text they completed, the last one with
``finish_reason`` and ``usage``. Errors end the call with the ``grpc_code`` of the ``PdflowError`` and its
message. A cancelled call (client gone, deadline passed) closes the generation, which aborts the request on
the workers. The server also answers the standard health check and server reflection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from frontdoor.textgen import TextDelta, TextGenerator, TextRequest
from protocol.auth import Credentials, caller_id
from protocol.errors import InvalidRequest, PdflowError
from protocol.ids import RequestId, check_request_id, new_request_id
from protocol.proto import router_pb2, router_pb2_grpc
from runtime.grpc_guard import GrpcGuard

log = logging.getLogger(__name__)
ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name  # "pdflow.v1.Router"


class RouterServicer(router_pb2_grpc.RouterServicer):
    """``pdflow.v1.Router`` over a ``TextGenerator``. An empty ``model`` means the served model; an empty
    ``request_id`` gets a fresh one (sent back in every response)."""

    def __init__(self, textgen: TextGenerator) -> None:
        self._textgen = textgen

    async def Generate(self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        # Written with context.write rather than as an async generator so that the finally below closes the
        # generation deterministically, also when the call is cancelled while a write is pending.
        if request.request_id and (why := check_request_id(request.request_id)):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)
        request_id = RequestId(request.request_id or new_request_id())
        deltas = None
        try:
            authorization = dict(context.invocation_metadata() or ()).get("authorization")
            text_request = _text_request(
                request, request_id, self._textgen.model_name, caller_id(authorization)
            )
            deltas = self._textgen.stream(text_request)
            async for delta in deltas:
                await context.write(_response(request_id, delta))
        except PdflowError as err:
            await context.abort(grpc.StatusCode[err.grpc_code], err.message)
        except Exception as exc:
            log.exception("unexpected error in Generate %s", request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
        finally:
            if deltas is not None:
                await deltas.aclose()

    async def Abort(
        self, request: router_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.AbortResponse:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        if why := check_request_id(request.request_id):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)
        found = await self._textgen.abort(RequestId(request.request_id))
        return router_pb2.AbortResponse(found=found)


async def _follow(servicer: Any, check: Callable[[], dict[str, Any]], period_s: float) -> None:
    serving, failing = True, False
    while True:
        try:
            ok = check().get("ok") is True
            failing = False
        except Exception:  # a health check that fails says: not serving (logged once per streak)
            if not failing:
                log.exception("front door health check failed")
            ok, failing = False, True
        if ok != serving:
            status = (
                health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            try:
                for service in ("", ROUTER_SERVICE):
                    await servicer.set(service, status)
                serving = ok
            except Exception:  # tried again next round
                log.exception("setting the gRPC health status failed")
        await asyncio.sleep(period_s)


def _text_request(
    request: router_pb2.GenerateRequest, request_id: RequestId, served: str, caller: str = ""
) -> TextRequest:
    """The ``TextRequest`` of a ``GenerateRequest``; proto3 zero values mean "not given"."""
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidRequest("One of prompt, chat or prompt_token_ids is required.", param="input")
    sp = request.sampling
    chat = request.chat.messages
    if sp.max_tokens < 0:
        raise InvalidRequest(
            f"max_tokens must be at least 1 (or 0 for the default); got {sp.max_tokens}.", param="max_tokens"
        )
    return TextRequest(
        model=request.model or served,
        request_id=request_id,
        prompt=request.prompt if which == "prompt" else None,
        messages=[{"role": m.role, "content": m.content} for m in chat] if which == "chat" else None,
        prompt_token_ids=list(request.prompt_token_ids.ids) if which == "prompt_token_ids" else None,
        max_tokens=sp.max_tokens or None,
        temperature=sp.temperature if sp.HasField("temperature") else None,
        top_p=sp.top_p if sp.HasField("top_p") else None,
        top_k=sp.top_k if sp.HasField("top_k") else None,
        seed=sp.seed if sp.HasField("seed") else None,
        stop=list(sp.stop),
        ignore_eos=sp.ignore_eos,
        priority=request.priority,
        caller=caller,
    )


def _response(request_id: RequestId, delta: TextDelta) -> router_pb2.GenerateResponse:
    response = router_pb2.GenerateResponse(request_id=request_id, token_ids=delta.token_ids, text=delta.text)
    if delta.finish_reason is not None:
        response.finish_reason = delta.finish_reason.value
    if delta.usage is not None:
        response.usage.CopyFrom(
            router_pb2.Usage(
                prompt_tokens=delta.usage.prompt_tokens,
                completion_tokens=delta.usage.completion_tokens,
                total_tokens=delta.usage.total_tokens,
            )
        )
    return response


async def start_grpc_server(
    textgen: TextGenerator,
    host: str,
    port: int,
    health_check: Callable[[], dict[str, Any]] | None = None,
    health_period_s: float = 1.0,
    credentials: Credentials | None = None,
    tls: tuple[bytes, bytes] | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start a ``grpc.aio`` server with the Router service, health checking and reflection, on
    ``host:port`` (0: a free port). Health ("" and ``pdflow.v1.Router``) follows ``health_check()["ok"]``,
    read every ``health_period_s`` (SERVING or NOT_SERVING, as HTTP's /health answers 200 or 503); without
    ``health_check``, SERVING. With API keys in ``credentials``, every call but health checks needs one. With
    ``tls`` (PEM certificate chain, private key), the port speaks TLS only.
    Returns the server and its bound port; the caller stops it with
    ``await server.stop(grace)``, which also ends the health follower."""
    credentials = credentials or Credentials()
    credentials.require_api_keys_for(host)  # CredentialError on an address others reach, without keys
    allows = credentials.allows_api
    server = grpc.aio.server(interceptors=[GrpcGuard(allows, "an API key")])
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(textgen), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (ROUTER_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    if tls is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        chain, key = tls
        bound = server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([(key, chain)]))
    if bound == 0:
        raise OSError(f"cannot bind the gRPC Router server to {host}:{port}")
    for service in ("", ROUTER_SERVICE):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    if health_check is not None:
        follower = asyncio.create_task(_follow(health_servicer, health_check, health_period_s))
        stop = server.stop

        async def stop_both(grace: float | None) -> None:
            follower.cancel()
            await stop(grace)

        server.stop = stop_both  # type: ignore[method-assign]
    log.info("gRPC pdflow.v1.Router listening on %s:%d", host, bound)
    return server, bound
