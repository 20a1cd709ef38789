"""The gRPC Router API over the scripted router, on a real ``grpc.aio`` server."""

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from frontdoor.tokenizer import ModelTokenizer
from protocol.errors import PoolEmpty
from protocol.messages import SamplingSpec
from protocol.proto import router_pb2, router_pb2_grpc
from tests.integration.api_harness import (
    CONTEXT,
    DEADLINE_S,
    DEFAULT_MAX_TOKENS,
    REPLY,
    Stack,
    grpc_channel,
    wait_for,
)

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------------------------------- gRPC


async def generate(channel: grpc.aio.Channel, **fields: Any) -> list[router_pb2.GenerateResponse]:
    stub = router_pb2_grpc.RouterStub(channel)
    return [r async for r in stub.Generate(router_pb2.GenerateRequest(**fields), timeout=DEADLINE_S)]


async def test_grpc_generate(
    make_stack: Callable[..., Stack], model_name: str, model_tokenizer: ModelTokenizer
) -> None:
    stack = make_stack()
    reply = model_tokenizer.encode(REPLY)
    async with grpc_channel(stack) as channel:
        by_prompt = await generate(
            channel,
            model=model_name,
            request_id="req-grpc-1",
            prompt="Say hello",
            sampling=router_pb2.SamplingParams(max_tokens=4, temperature=0.5, seed=9),
            priority=2,
        )
        call = stack.router.last
        by_chat = await generate(
            channel,
            chat={"messages": [{"role": "user", "content": "Hi"}]},
            sampling=router_pb2.SamplingParams(stop=["Good"]),
        )
        by_ids = await generate(channel, prompt_token_ids={"ids": [1, 2, 3]})
        ids_call = stack.router.last

    assert [list(r.token_ids) for r in by_prompt] == [[t] for t in reply[:4]]
    assert "".join(r.text for r in by_prompt) == model_tokenizer.decode(reply[:4])
    assert {r.request_id for r in by_prompt} == {"req-grpc-1"}
    assert [r.finish_reason for r in by_prompt] == ["", "", "", "length"]
    n_prompt = len(model_tokenizer.encode("Say hello"))
    assert by_prompt[-1].usage == router_pb2.Usage(
        prompt_tokens=n_prompt, completion_tokens=4, total_tokens=n_prompt + 4
    )
    assert (call.request_id, call.priority) == ("req-grpc-1", 2)
    assert call.sampling == SamplingSpec(max_tokens=4, temperature=0.5, seed=9)

    assert "".join(r.text for r in by_chat) == "Hello world. "
    assert by_chat[-1].finish_reason == "stop" and by_chat[0].request_id.startswith("req-")
    assert ids_call.prompt_token_ids == (1, 2, 3)
    assert ids_call.sampling.max_tokens == DEFAULT_MAX_TOKENS and ids_call.sampling.seed is None
    assert "".join(r.text for r in by_ids) == REPLY and by_ids[-1].usage.prompt_tokens == 3


@pytest.mark.parametrize(
    ("fields", "code", "details"),
    [
        (
            {"prompt": "hi", "model": "gpt-4"},
            grpc.StatusCode.NOT_FOUND,
            "The model 'gpt-4' does not exist; this server serves 'SmolLM2-135M-Instruct'.",
        ),
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "One of prompt, chat or prompt_token_ids is required."),
        (
            {"prompt": ""},
            grpc.StatusCode.INVALID_ARGUMENT,
            "The prompt is empty; give at least one character.",
        ),
        ({"chat": {}}, grpc.StatusCode.INVALID_ARGUMENT, "'messages' is empty; give at least one message."),
        (
            {"prompt_token_ids": {}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "The prompt's token id list is empty; give at least one token id.",
        ),
        (
            {"prompt_token_ids": {"ids": [49152]}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "Token id 49152 is out of vocabulary; this model's token ids are 0 to 49151.",
        ),
        (
            {"prompt": "hi", "sampling": {"max_tokens": -2}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens must be at least 1 (or 0 for the default); got -2.",
        ),
        (
            {"prompt_token_ids": {"ids": [5] * 250}, "sampling": {"max_tokens": 10}},
            grpc.StatusCode.INVALID_ARGUMENT,
            f"This model's maximum context length is {CONTEXT} tokens. "
            f"However, you requested 260 tokens (250 in "
            "the prompt, 10 in the completion). Please reduce the length of the prompt or completion.",
        ),
        (
            {"prompt": "hi", "sampling": {"temperature": -1}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature must be between 0 and 2; got -1.0.",
        ),
        (
            {"prompt": "hi", "sampling": {"stop": list("abcde")}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "At most 4 stop sequences are supported; got 5.",
        ),
        (
            {"chat": {"messages": [{"role": "bot", "content": "x"}]}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[0].role must be one of assistant, developer, system, tool, user; got 'bot'.",
        ),
        # a client-chosen id names transfers, log lines and the controller's request log: kept short, plain
        (
            {"prompt": "hi", "request_id": "r" * 4_000_000},
            grpc.StatusCode.INVALID_ARGUMENT,
            "request_id is 4000000 characters long; at most 128 are accepted",
        ),
        (
            {"prompt": "hi", "request_id": "req/../../etc\n"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "request_id may hold only letters, digits and . _ : - (it names transfers and log lines)",
        ),
        (  # 81: the most characters a SmolLM2 token stands for (ModelTokenizer.max_token_chars)
            {"prompt": "a" * (CONTEXT * 81 + 1)},
            grpc.StatusCode.INVALID_ARGUMENT,
            f"This model's maximum context length is {CONTEXT} tokens, which no text of more than "
            f"{CONTEXT * 81} characters fits; your prompt has {CONTEXT * 81 + 1}. Please reduce its length.",
        ),
    ],
)
async def test_grpc_bad_request(
    make_stack: Callable[..., Stack], fields: dict[str, Any], code: grpc.StatusCode, details: str
) -> None:
    stack = make_stack()
    async with grpc_channel(stack) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate(channel, **fields)
    assert (info.value.code(), info.value.details()) == (code, details)
    assert stack.router.calls == []


async def test_grpc_router_errors(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(error=PoolEmpty("no live prefill worker"))
    async with grpc_channel(stack) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate(channel, prompt="hi")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "no live prefill worker"


async def test_grpc_cancel_closes_the_router_stream(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(hang_after=2)
    async with grpc_channel(stack) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        call = stub.Generate(router_pb2.GenerateRequest(prompt="hi"), timeout=DEADLINE_S)
        first = await call.read()
        assert first.text == "Hello"
        await wait_for(stack.router.last.hanging)
        call.cancel()
        await wait_for(stack.router.last.done)
    assert stack.router.last.closed_early


async def test_grpc_abort(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(hang_after=1)
    async with grpc_channel(stack) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        call = stub.Generate(router_pb2.GenerateRequest(prompt="hi", request_id="req-abort-me"))
        assert (await call.read()).text == "Hello"
        await wait_for(stack.router.last.hanging)
        found = await stub.Abort(router_pb2.AbortRequest(request_id="req-abort-me"), timeout=DEADLINE_S)
        rest = []
        while (message := await call.read()) is not grpc.aio.EOF:
            rest.append(message)
        again = await stub.Abort(router_pb2.AbortRequest(request_id="req-abort-me"), timeout=DEADLINE_S)
        with pytest.raises(grpc.aio.AioRpcError) as no_id:
            await stub.Abort(router_pb2.AbortRequest(), timeout=DEADLINE_S)
    assert found.found and not again.found
    assert [(r.text, r.finish_reason) for r in rest] == [("", "abort")]
    assert rest[-1].usage.completion_tokens == 1
    assert no_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with grpc_channel(stack) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as long_id:
            stub = router_pb2_grpc.RouterStub(channel)
            await stub.Abort(router_pb2.AbortRequest(request_id="x" * 200), timeout=DEADLINE_S)
    assert long_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_grpc_health_and_reflection(make_stack: Callable[..., Stack]) -> None:
    async with grpc_channel(make_stack()) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        statuses = [
            (await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=DEADLINE_S)).status
            for name in ("", "pdflow.v1.Router")
        ]
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(health_pb2.HealthCheckRequest(service="pdflow.v1.Nope"), timeout=DEADLINE_S)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="pdflow.v1.Router"),
        ]
        answers = [a async for a in reflection.ServerReflectionInfo(iter(requests), timeout=DEADLINE_S)]
    assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 2
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    services = {s.name for s in answers[0].list_services_response.service}
    assert services >= {
        "pdflow.v1.Router",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert answers[1].file_descriptor_response.file_descriptor_proto  # the router.proto descriptor itself


async def test_grpc_health_follows_the_front_doors_health(make_stack: Callable[..., Stack]) -> None:
    """A load balancer that checks gRPC health sees what /health says: it used to say SERVING for good."""
    import asyncio

    from frontdoor.grpc_api import start_grpc_server

    stack = make_stack()
    server, port = await start_grpc_server(
        stack.textgen, "127.0.0.1", 0, health_check=lambda: stack.health, health_period_s=0.02
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status_becomes(wanted: int) -> None:
                async def check() -> int:
                    request = health_pb2.HealthCheckRequest(service="pdflow.v1.Router")
                    return (await health.Check(request, timeout=DEADLINE_S)).status

                while await check() != wanted:
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(status_becomes(health_pb2.HealthCheckResponse.SERVING), DEADLINE_S)
            stack.health["ok"] = False  # e.g. the decode pool is empty
            await asyncio.wait_for(status_becomes(health_pb2.HealthCheckResponse.NOT_SERVING), DEADLINE_S)
            stack.health["ok"] = True
            await asyncio.wait_for(status_becomes(health_pb2.HealthCheckResponse.SERVING), DEADLINE_S)
    finally:
        await server.stop(None)
