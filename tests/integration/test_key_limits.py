"""``frontdoor.max_concurrent_per_key``: one API key may have so many requests in flight on a front door;
one more gets 429 with Retry-After (gRPC RESOURCE_EXHAUSTED) at once, other keys are not affected, and a
request that ends frees its place."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from frontdoor.textgen import TextGenerator
from frontdoor.tokenizer import ModelTokenizer
from protocol.proto import router_pb2, router_pb2_grpc
from tests.integration.api_harness import (
    CONTEXT,
    DEADLINE_S,
    DEFAULT_MAX_TOKENS,
    REPLY,
    ScriptedRouter,
    Stack,
    api_app,
    grpc_channel,
    uvicorn_server,
)

pytestmark = pytest.mark.integration


def _stack(model_tokenizer: ModelTokenizer, model_name: str) -> Stack:
    router = ScriptedRouter(model_tokenizer.encode(REPLY), hang_after=1)  # every request stays in flight
    textgen = TextGenerator(
        router, model_tokenizer, model_name, CONTEXT, DEFAULT_MAX_TOKENS, max_concurrent_per_key=2
    )
    return Stack(router, textgen, api_app(textgen), {})


async def test_one_key_past_its_limit_is_refused_at_once_and_others_are_served(
    model_tokenizer: ModelTokenizer, model_name: str
) -> None:
    stack = _stack(model_tokenizer, model_name)
    body = {"model": model_name, "prompt": "Hi", "max_tokens": 8, "stream": True}
    async with (
        uvicorn_server(stack.app) as url,  # a real server: ASGI in-process would wait for each stream's end
        httpx.AsyncClient(base_url=url, timeout=DEADLINE_S) as client,
    ):

        async def held(key: str) -> httpx.Response:  # a stream left open: its request stays in flight
            request = client.build_request(
                "POST", "/v1/completions", json=body, headers={"authorization": f"Bearer {key}"}
            )
            return await client.send(request, stream=True)

        first = [await held("sk-a"), await held("sk-a")]
        assert [r.status_code for r in first] == [200, 200]
        refused = await client.post(
            "/v1/completions", json=body, headers={"authorization": "Bearer sk-a"}, timeout=DEADLINE_S
        )
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert "frontdoor.max_concurrent_per_key" in refused.json()["error"]["message"]
        other = await held("sk-b")
        assert other.status_code == 200

        await stack.textgen.abort(stack.router.calls[0].request_id)
        await first[0].aread()  # its stream ends: its place is free again
        again = await held("sk-a")
        assert again.status_code == 200
        for response in (first[1], other, again):
            await response.aclose()


async def test_over_grpc_the_key_past_its_limit_gets_resource_exhausted(
    model_tokenizer: ModelTokenizer, model_name: str
) -> None:
    stack = _stack(model_tokenizer, model_name)
    request = router_pb2.GenerateRequest(model=model_name, prompt="Hi")
    key = (("authorization", "Bearer sk-a"),)
    async with grpc_channel(stack) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        held = [stub.Generate(request, metadata=key, timeout=DEADLINE_S) for _ in range(2)]
        for call in held:
            await call.read()  # its first token: it is in flight
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Generate(request, metadata=key, timeout=DEADLINE_S):
                pass
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in held:
            call.cancel()
        await asyncio.sleep(0)
