"""With credentials configured, every surface refuses a caller without them, as a stranger on the network
would try it: every HTTP path, every method of the gRPC Router and Admin services (and reflection), and the
KV side channel. And the holder of the right credential gets through."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import httpx
import pytest
import zmq
from starlette.routing import Route

from controller.admin_service import start_admin_server
from frontdoor.grpc_api import start_grpc_server
from frontdoor.textgen import TextGenerator
from kv_transfer.exchange.endpoint import KVEndpoint, TransferFailed
from kv_transfer.transport.fake import FakeFabric, InProcessTransport
from kv_transfer.transport.side_channel import SideChannelClient, SideChannelError
from pdctl.admin_client import AdminClient, AdminUnavailable
from protocol.auth import Credentials
from protocol.kv_ops import Reserve, op_to_wire
from protocol.proto import admin_pb2, router_pb2
from tests.integration.api_harness import api_app, uvicorn_server
from tests.support.kv import NOTHING_HELD, endpoint_pair, make_layers, send

API_KEY, ADMIN, SECRET = "sk-test-key-1", "admin-token-0123456789", "cluster-secret-0123456789"
SCRAPER = "metrics-token-0123456789"
CREDENTIALS = Credentials.from_env(
    {
        "PDFLOW_API_KEYS": f"{API_KEY},sk-other",
        "PDFLOW_ADMIN_TOKEN": ADMIN,
        "PDFLOW_METRICS_TOKEN": SCRAPER,
        "PDFLOW_CLUSTER_SECRET": SECRET,
    }
)
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
DEADLINE_S = 10.0


@pytest.fixture
def app(textgen: TextGenerator) -> Any:
    return api_app(textgen, credentials=CREDENTIALS)


def _requests(app: Any) -> Iterator[tuple[str, str]]:
    """Every (method, path) the app serves, path parameters filled in, and a path it does not serve."""
    for route in app.routes:
        assert isinstance(route, Route)
        path = route.path.replace("{model_id:path}", "some-model")
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                yield method, path
    yield "GET", "/no/such/path"


async def test_every_http_path_but_health_needs_an_api_key(app: Any) -> None:
    requests = list(_requests(app))
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/metrics")} <= set(
        requests
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pdflow") as client:
        for method, path in requests:
            # no key, a wrong one, the admin token (no API key), the scraper's token off /metrics, a key
            # without its scheme
            scraper = f"Bearer {SCRAPER}" if path != "/metrics" else "Bearer x"
            for auth in (None, "Bearer sk-wrong", f"Bearer {ADMIN}", scraper, API_KEY):
                headers = {"authorization": auth} if auth else {}
                body = {"model": "m", "prompt": "hi"} if method == "POST" else None
                response = await client.request(method, path, json=body, headers=headers)
                if path == "/health":
                    assert response.status_code == 200
                    continue
                assert response.status_code == 401, (method, path, auth, response.text)
                assert response.headers["www-authenticate"].startswith("Bearer")
                error = response.json()["error"]
                assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]
        served = await client.get("/v1/models", headers={"authorization": f"Bearer {API_KEY}"})
        assert served.status_code == 200
        for token in (API_KEY, "sk-other", SCRAPER):  # a scraper holds an API key or the metrics token
            metrics = await client.get("/metrics", headers={"authorization": f"bearer {token}"})
            assert metrics.status_code == 200 and b"pdflow_up" in metrics.content


async def test_the_openai_client_with_its_api_key_is_served_and_without_it_is_refused(app: Any) -> None:
    from openai import AsyncOpenAI, AuthenticationError

    async with uvicorn_server(app) as url:
        good = AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=DEADLINE_S)
        model = (await good.models.list()).data[0].id
        completion = await good.completions.create(model=model, prompt="Hi", max_tokens=4)
        assert completion.choices[0].text
        bad = AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-guess", max_retries=0, timeout=DEADLINE_S)
        with pytest.raises(AuthenticationError, match="does not accept"):
            await bad.models.list()


def _methods(service: Any) -> list[tuple[str, bool]]:
    return [(f"/{service.full_name}/{m.name}", m.server_streaming) for m in service.methods]


async def _call(channel: grpc.aio.Channel, path: str, streaming: bool, token: str | None) -> grpc.StatusCode:
    """Call ``path`` with an empty request; the status it ends with."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        if path == REFLECTION:
            call = channel.stream_stream(path)(iter([b""]), metadata=metadata, timeout=DEADLINE_S)
            async for _ in call:
                pass
        elif streaming:
            async for _ in channel.unary_stream(path)(b"", metadata=metadata, timeout=DEADLINE_S):
                pass
        else:
            await channel.unary_unary(path)(b"", metadata=metadata, timeout=DEADLINE_S)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@contextlib.asynccontextmanager
async def _channel(server_port: tuple[Any, int]) -> AsyncIterator[grpc.aio.Channel]:
    server, port = server_port
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


async def test_every_router_method_and_reflection_need_an_api_key(textgen: TextGenerator) -> None:
    router_service = router_pb2.DESCRIPTOR.services_by_name["Router"]
    served = await start_grpc_server(textgen, "127.0.0.1", 0, credentials=CREDENTIALS)
    async with _channel(served) as channel:
        for path, streaming in [*_methods(router_service), (REFLECTION, True)]:
            for token in (None, "sk-wrong", ADMIN):
                assert await _call(channel, path, streaming, token) is grpc.StatusCode.UNAUTHENTICATED, (
                    path,
                    token,
                )
        assert await _call(channel, HEALTH_CHECK, False, None) is grpc.StatusCode.OK  # probes need none
        request = router_pb2.GenerateRequest(prompt="Hi", sampling=router_pb2.SamplingParams(max_tokens=3))
        generate = channel.unary_stream(
            f"/{router_service.full_name}/Generate",
            request_serializer=router_pb2.GenerateRequest.SerializeToString,
            response_deserializer=router_pb2.GenerateResponse.FromString,
        )
        responses = [
            r
            async for r in generate(
                request, metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=DEADLINE_S
            )
        ]
        assert responses[-1].finish_reason
        refused = generate(request, timeout=DEADLINE_S)
        with pytest.raises(grpc.aio.AioRpcError) as refusal:
            async for _ in refused:
                pass
        assert refusal.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer <an API key>" in (refusal.value.details() or "")


class _NoBackend:
    """The admin server's backend; refused calls never reach it."""

    autoscaler = None


async def test_every_admin_method_needs_the_admin_token_and_pdctl_sends_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    admin_service = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    served = await start_admin_server(_NoBackend(), "127.0.0.1", 0, CREDENTIALS)  # type: ignore[arg-type]
    address = f"127.0.0.1:{served[1]}"
    async with _channel(served) as channel:
        methods = _methods(admin_service)
        assert {"/pdflow.v1.Admin/Migrate", "/pdflow.v1.Admin/Drain", "/pdflow.v1.Admin/Scale"} <= {
            p for p, _ in methods
        }
        for path, streaming in [*methods, (REFLECTION, True)]:
            for token in (None, API_KEY, "admin-guess-0123456789"):  # an API key is no admin token
                assert await _call(channel, path, streaming, token) is grpc.StatusCode.UNAUTHENTICATED, (
                    path,
                    token,
                )
        assert await _call(channel, HEALTH_CHECK, False, None) is grpc.StatusCode.OK
        monkeypatch.delenv("PDFLOW_ADMIN_TOKEN", raising=False)
        with AdminClient(address) as client, pytest.raises(AdminUnavailable, match="set PDFLOW_ADMIN_TOKEN"):
            await asyncio.to_thread(client.autoscaler)
        monkeypatch.setenv("PDFLOW_ADMIN_TOKEN", "admin-guess-0123456789")
        with AdminClient(address) as client, pytest.raises(AdminUnavailable, match="is not the cluster's"):
            await asyncio.to_thread(client.autoscaler)
        monkeypatch.setenv("PDFLOW_ADMIN_TOKEN", ADMIN)
        with AdminClient(address) as client, pytest.raises(AdminUnavailable, match="FAILED_PRECONDITION"):
            await asyncio.to_thread(client.autoscaler)  # through: this backend has no autoscaler


@pytest.fixture
def signed_pair() -> Iterator[tuple[KVEndpoint, KVEndpoint]]:
    with endpoint_pair(CREDENTIALS.cluster_secret) as pair:
        yield pair


def test_the_side_channel_serves_only_messages_signed_with_the_cluster_secret(signed_pair) -> None:
    sender, receiver = signed_pair
    tid = send(sender, receiver, "int8", make_layers())  # signed both ways: served
    incoming = receiver.take(tid)
    assert incoming is not None
    receiver.release(tid, decode_s=0.0)
    reserve = Reserve(transfer_id="stolen", request_id="r", nbytes=1024, peer={})
    for secret in (None, b"another-cluster-secret"):
        with pytest.raises(SideChannelError, match="not signed with this cluster's secret"):
            SideChannelClient(receiver.address, secret).ask(reserve, timeout_s=DEADLINE_S)
    sock = zmq.Context.instance().socket(zmq.DEALER)  # by hand: a body with a forged or replaced tag
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{receiver.address}")
    try:
        body = json.dumps(op_to_wire(reserve)).encode()
        for frames in ([b"", body], [b"", body, b"x" * 32], [b"", body, b""]):
            sock.send_multipart(frames)
            assert sock.poll(int(DEADLINE_S * 1000))
            _, reply, *_ = sock.recv_multipart()
            assert json.loads(reply)["ok"] is False and "not signed" in json.loads(reply)["error"]
    finally:
        sock.close()
    assert receiver.held == NOTHING_HELD  # nothing reserved for any of them


def test_endpoints_with_different_secrets_fail_the_transfer_with_a_clear_error() -> None:
    fabric = FakeFabric()
    sender = KVEndpoint(
        InProcessTransport("p", 1 << 20, fabric), secret=b"secret-of-cluster-one", timeout_s=5
    )
    receiver = KVEndpoint(InProcessTransport("d", 1 << 20, fabric), secret=b"secret-of-cluster-two")
    try:
        with pytest.raises(TransferFailed, match="PDFLOW_CLUSTER_SECRET"):
            send(sender, receiver, "none", make_layers())
        assert receiver.held == NOTHING_HELD and sender.held == NOTHING_HELD
    finally:
        sender.close()
        receiver.close()
