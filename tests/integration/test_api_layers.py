"""The front door's API layers over a scripted token router: the OpenAI HTTP API (in-process via ASGI, and a
real uvicorn server read by the official ``openai`` client) and the gRPC Router API (a real ``grpc.aio``
server). The scripted router stands in for the worker pools: it yields given token ids and records what
it was asked and whether its stream was closed before the end (which is how the real router aborts)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from controller.grpc_router import start_grpc_server
from controller.http_api import build_http_app
from controller.textgen import TextGenerator, TextRequest, Usage
from controller.tokenizer import ModelTokenizer
from protocol.errors import PdflowError, PoolEmpty, WorkerFailed
from protocol.ids import RequestId
from protocol.messages import FinishReason, SamplingSpec, TokenChunk
from protocol.proto import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration

CONTEXT = 256
DEFAULT_MAX_TOKENS = 32
REPLY = "Hello world. Goodbye, friend!"
DEADLINE_S = 10.0
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@dataclass
class Call:
    request_id: RequestId
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec
    priority: int
    completed: bool = False  # the last chunk went out
    done: asyncio.Event = field(default_factory=asyncio.Event)  # the stream is over, one way or another
    hanging: asyncio.Event = field(default_factory=asyncio.Event)
    aborted: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def closed_early(self) -> bool:
        return self.done.is_set() and not self.completed


@dataclass
class ScriptedRouter:
    """A ``TokenRouter`` that yields ``reply`` one token per chunk (at most ``sampling.max_tokens``). With
    ``hang_after=k`` it waits after k tokens until aborted or closed; ``error`` is raised after
    ``error_after`` tokens."""

    reply: list[int]
    hang_after: int | None = None
    error: PdflowError | None = None
    error_after: int = 0
    calls: list[Call] = field(default_factory=list)
    started: asyncio.Queue[Call] = field(default_factory=asyncio.Queue)

    @property
    def last(self) -> Call:
        return self.calls[-1]

    async def generate(
        self,
        request_id: RequestId,
        prompt_token_ids: tuple[int, ...],
        sampling: SamplingSpec,
        priority: int = 0,
    ) -> AsyncIterator[TokenChunk]:
        call = Call(request_id, prompt_token_ids, sampling, priority)
        self.calls.append(call)
        self.started.put_nowait(call)
        tokens = self.reply[: sampling.max_tokens]
        finish = FinishReason.LENGTH if len(self.reply) > sampling.max_tokens else FinishReason.STOP
        try:
            for i, token_id in enumerate(tokens):
                if self.error is not None and i == self.error_after:
                    raise self.error
                if i == self.hang_after:
                    call.hanging.set()
                    await call.aborted.wait()
                    call.completed = True
                    yield TokenChunk(request_id, (), FinishReason.ABORT)
                    return
                last = i == len(tokens) - 1
                call.completed = last
                yield TokenChunk(request_id, (token_id,), finish if last else None)
        finally:
            call.done.set()

    async def abort(self, request_id: RequestId) -> bool:
        running = [c for c in self.calls if c.request_id == request_id and not c.done.is_set()]
        for call in running:
            call.aborted.set()
        return bool(running)


@dataclass
class Stack:
    router: ScriptedRouter
    textgen: TextGenerator
    app: FastAPI
    health: dict[str, Any]


@pytest.fixture
def make_stack(model_tokenizer: ModelTokenizer, model_name: str) -> Callable[..., Stack]:
    def make(reply: str = REPLY, **router_options: Any) -> Stack:
        router = ScriptedRouter(model_tokenizer.encode(reply), **router_options)
        textgen = TextGenerator(router, model_tokenizer, model_name, CONTEXT, DEFAULT_MAX_TOKENS)
        health: dict[str, Any] = {"ok": True, "prefill_workers": 1, "decode_workers": 1}
        metrics = (b"pdflow_up 1\n", "text/plain; version=0.0.4; charset=utf-8")
        app = build_http_app(
            textgen, model_name=model_name, health=lambda: health, metrics_text=lambda: metrics
        )
        return Stack(router, textgen, app, health)

    return make


@contextlib.asynccontextmanager
async def asgi_client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=stack.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://frontdoor") as client:
        yield client


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@contextlib.asynccontextmanager
async def uvicorn_server(app: FastAPI) -> AsyncIterator[str]:
    """A real uvicorn server on 127.0.0.1 and a free port; yields its base URL."""
    server = _Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", timeout_graceful_shutdown=2
        )
    )
    serving = asyncio.create_task(server.serve())
    ready = asyncio.create_task(server.ready.wait())
    await asyncio.wait((serving, ready), timeout=DEADLINE_S, return_when=asyncio.FIRST_COMPLETED)
    assert server.ready.is_set(), "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, DEADLINE_S)


@contextlib.asynccontextmanager
async def grpc_channel(stack: Stack) -> AsyncIterator[grpc.aio.Channel]:
    server, port = await start_grpc_server(stack.textgen, "127.0.0.1", 0)
    assert port > 0
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


def sse_events(body: str) -> list[Any]:
    """Parse an SSE body strictly: only ``data: ...`` events separated by blank lines, ending with [DONE]."""
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), body
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


async def wait_for(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), DEADLINE_S)


# --------------------------------------------------------------------------------------------- HTTP, ASGI


async def test_models(make_stack: Callable[..., Stack], model_name: str) -> None:
    async with asgi_client(make_stack()) as client:
        listing = (await client.get("/v1/models")).json()
        one = await client.get(f"/v1/models/{model_name}")
        missing = await client.get("/v1/models/gpt-4")
    assert [m["id"] for m in listing["data"]] == [model_name]
    assert listing["data"][0]["max_model_len"] == CONTEXT
    assert one.json()["id"] == model_name
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


async def test_completion(
    make_stack: Callable[..., Stack], model_name: str, model_tokenizer: ModelTokenizer
) -> None:
    stack = make_stack()
    async with asgi_client(stack) as client:
        response = await client.post(
            COMPLETIONS,
            json={
                "model": model_name,
                "prompt": "Say hello",
                "max_tokens": 3,
                "temperature": 0,
                "seed": 11,
                "priority": 5,
            },
        )
    assert response.status_code == 200, response.text
    body = response.json()
    reply_ids = model_tokenizer.encode(REPLY)
    assert body["choices"] == [
        {
            "index": 0,
            "text": model_tokenizer.decode(reply_ids[:3]),
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    prompt_ids = model_tokenizer.encode("Say hello")
    assert body["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 3,
        "total_tokens": len(prompt_ids) + 3,
    }
    assert body["id"] == f"cmpl-{response.headers['x-request-id']}"
    assert (body["object"], body["model"], type(body["created"])) == ("text_completion", model_name, int)
    call = stack.router.last
    assert call.request_id == response.headers["x-request-id"]
    assert call.prompt_token_ids == tuple(prompt_ids)
    assert call.sampling == SamplingSpec(max_tokens=3, temperature=0.0, seed=11)
    assert call.priority == 5


@pytest.mark.parametrize("form", [lambda ids: ["Say hello"], lambda ids: ids, lambda ids: [ids]])
async def test_completion_prompt_forms(
    make_stack: Callable[..., Stack],
    model_name: str,
    model_tokenizer: ModelTokenizer,
    form: Callable[..., Any],
) -> None:
    ids = model_tokenizer.encode("Say hello")
    stack = make_stack()
    async with asgi_client(stack) as client:
        response = await client.post(COMPLETIONS, json={"model": model_name, "prompt": form(ids)})
    assert response.status_code == 200, response.text
    assert stack.router.last.prompt_token_ids == tuple(ids)
    assert response.json()["choices"][0]["text"] == REPLY
    assert response.json()["choices"][0]["finish_reason"] == "stop"


async def test_chat_completion(
    make_stack: Callable[..., Stack], model_name: str, model_tokenizer: ModelTokenizer
) -> None:
    stack = make_stack()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    async with asgi_client(stack) as client:
        response = await client.post(
            CHAT, json={"model": model_name, "messages": messages, "max_completion_tokens": 64}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-req-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert stack.router.last.prompt_token_ids == tuple(model_tokenizer.apply_chat_template(messages))
    assert body["usage"]["prompt_tokens"] == len(stack.router.last.prompt_token_ids)
    assert body["usage"]["completion_tokens"] == len(model_tokenizer.encode(REPLY))


HI = [{"role": "user", "content": "hi"}]
M = "MODEL"  # replaced by the served model's name

BAD_REQUESTS: list[tuple[str, Any, int, str, str | None]] = [
    # (path, body, status, message (start), param); the body gets "stream": false and true
    (
        COMPLETIONS,
        b'{"model": "M", "prompt": ',
        400,
        "We could not parse the JSON body of your request",
        None,
    ),
    (COMPLETIONS, b"[1, 2]", 400, "The request body must be a JSON object, not list.", None),
    (COMPLETIONS, {"prompt": "hi"}, 400, "Missing required parameter: 'model'.", "model"),
    (CHAT, {"model": M}, 400, "Missing required parameter: 'messages'.", "messages"),
    (
        COMPLETIONS,
        {"model": M, "prompt": "hi", "max_tokens": "many"},
        400,
        "Invalid value for 'max_tokens': Input should be a valid integer",
        "max_tokens",
    ),
    (
        COMPLETIONS,
        {"model": M, "prompt": {"text": "hi"}},
        400,
        "Invalid type for 'prompt': expected a string, a list of one string, or a list of token ids.",
        "prompt",
    ),
    (
        COMPLETIONS,
        {"model": M, "prompt": "hi", "stop": 3},
        400,
        "Invalid type for 'stop': expected a string or a list of strings.",
        "stop",
    ),
    (
        CHAT,
        {"model": M, "messages": [{"content": "hi"}]},
        400,
        "Missing required parameter: 'messages.0.role'.",
        "messages.0.role",
    ),
    (
        COMPLETIONS,
        {"model": "gpt-4", "prompt": "hi"},
        404,
        "The model 'gpt-4' does not exist; this server serves 'SmolLM2-135M-Instruct'.",
        "model",
    ),
    (
        COMPLETIONS,
        {"model": M, "prompt": "hi", "n": 2},
        400,
        "'n' is not supported by this server (only n=1)",
        "n",
    ),
    (COMPLETIONS, {"model": M, "prompt": "hi", "best_of": 3}, 400, "'best_of' is not supported", "best_of"),
    (
        COMPLETIONS,
        {"model": M, "prompt": "hi", "logprobs": 1},
        400,
        "'logprobs' is not supported by this server.",
        "logprobs",
    ),
    (
        COMPLETIONS,
        {"model": M, "prompt": "hi", "echo": True},
        400,
        "'echo' is not supported by this server.",
        "echo",
    ),
    (CHAT, {"model": M, "messages": HI, "n": 3}, 400, "'n' is not supported by this server (only n=1).", "n"),
    (CHAT, {"model": M, "messages": HI, "logprobs": True}, 400, "'logprobs' is not supported", "logprobs"),
    (
        COMPLETIONS,
        {"model": M, "prompt": ["a", "b"]},
        400,
        "Batched prompts (a list of several prompts) are not supported",
        "prompt",
    ),
    (COMPLETIONS, {"model": M, "prompt": ""}, 400, "The prompt is empty", "prompt"),
    (COMPLETIONS, {"model": M, "prompt": []}, 400, "The prompt is empty", "prompt"),
    (COMPLETIONS, {"model": M, "prompt": [[]]}, 400, "The prompt's token id list is empty", "prompt"),
    (CHAT, {"model": M, "messages": []}, 400, "'messages' is empty", "messages"),
    (
        COMPLETIONS,
        {"model": M, "prompt": [1, 99999]},
        400,
        "Token id 99999 is out of vocabulary; this model's token ids are 0 to 49151.",
        "prompt",
    ),
    (
        COMPLETIONS,
        {"model": M, "prompt": "hi", "max_tokens": 0},
        400,
        "max_tokens must be at least 1; got 0.",
        "max_tokens",
    ),
    (
        COMPLETIONS,
        {"model": M, "prompt": [7] * CONTEXT},
        400,
        f"This model's maximum context length is {CONTEXT} tokens. "
        f"However, you requested {CONTEXT} tokens in "
        "the prompt",
        "prompt",
    ),
    (
        COMPLETIONS,
        {"model": M, "prompt": [7] * 200, "max_tokens": 100},
        400,
        f"This model's maximum context length is {CONTEXT} tokens. "
        f"However, you requested 300 tokens (200 in "
        "the prompt, 100 in the completion).",
        "max_tokens",
    ),
    (
        CHAT,
        {"model": M, "messages": HI, "temperature": 3},
        400,
        "temperature must be between 0 and 2",
        "temperature",
    ),
    (
        COMPLETIONS,
        {"model": M, "prompt": "hi", "top_p": 0},
        400,
        "top_p must be greater than 0 and at most 1; got 0.0.",
        "top_p",
    ),
    (
        COMPLETIONS,
        {"model": M, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]},
        400,
        "At most 4 stop sequences are supported; got 5.",
        "stop",
    ),
    (
        CHAT,
        {"model": M, "messages": [{"role": "robot", "content": "hi"}]},
        400,
        "messages[0].role must be one of",
        "messages[0].role",
    ),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("path", "body", "status", "message", "param"), BAD_REQUESTS)
async def test_bad_request(
    make_stack: Callable[..., Stack],
    model_name: str,
    stream: bool,
    path: str,
    body: Any,
    status: int,
    message: str,
    param: str | None,
) -> None:
    stack = make_stack()
    if isinstance(body, dict):
        body = {**body, "stream": stream, **({"model": model_name} if body.get("model") == M else {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with asgi_client(stack) as client:
        response = await client.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["message"].startswith(message), error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == ("model_not_found" if status == 404 else "invalid_request")
    assert stack.router.calls == []


async def test_unknown_route_and_method(make_stack: Callable[..., Stack]) -> None:
    async with asgi_client(make_stack()) as client:
        missing = await client.post("/v1/embeddings", json={})
        wrong_method = await client.get("/v1/completions")
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "Not Found: POST /v1/embeddings"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["message"] == "Method Not Allowed: GET /v1/completions"


@pytest.mark.parametrize("stream", [False, True])
async def test_router_error_before_first_token_has_its_status(
    make_stack: Callable[..., Stack], model_name: str, stream: bool
) -> None:
    stack = make_stack(error=PoolEmpty("no live decode worker"))
    async with asgi_client(stack) as client:
        response = await client.post(COMPLETIONS, json={"model": model_name, "prompt": "x", "stream": stream})
    assert response.status_code == 503
    assert response.json() == {
        "error": {
            "message": "no live decode worker",
            "type": "service_unavailable",
            "param": None,
            "code": "pool_empty",
        }
    }


async def test_router_error_mid_stream(make_stack: Callable[..., Stack], model_name: str) -> None:
    stack = make_stack(error=WorkerFailed("decode-0 died"), error_after=2)
    async with asgi_client(stack) as client:
        streamed = await client.post(COMPLETIONS, json={"model": model_name, "prompt": "hi", "stream": True})
        whole = await client.post(COMPLETIONS, json={"model": model_name, "prompt": "hi"})
    assert streamed.status_code == 200
    events = sse_events(streamed.text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Hello world"
    assert events[-1] == {
        "error": {"message": "decode-0 died", "type": "worker_error", "param": None, "code": "worker_failed"}
    }
    assert whole.status_code == 502
    assert whole.json()["error"]["message"] == "decode-0 died"


async def test_sse_format_and_usage(
    make_stack: Callable[..., Stack], model_name: str, model_tokenizer: ModelTokenizer
) -> None:
    stack = make_stack()
    async with asgi_client(stack) as client:
        response = await client.post(
            COMPLETIONS,
            json={
                "model": model_name,
                "prompt": "hi",
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        chat = await client.post(
            CHAT, json={"model": model_name, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    *chunks, usage = events
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert len({c["id"] for c in events}) == 1 and events[0]["id"].startswith("cmpl-req-")
    assert "".join(c["choices"][0]["text"] for c in chunks) == REPLY
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "stop"]
    n_reply = len(model_tokenizer.encode(REPLY))
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 1, "completion_tokens": n_reply, "total_tokens": 1 + n_reply}

    chat_events = sse_events(chat.text)
    assert chat_events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and "usage" not in e for e in chat_events)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in chat_events) == REPLY
    assert chat_events[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("stop", "text"),
    [
        (["."], "Hello world"),
        (["ld. G"], "Hello wor"),  # spans three tokens
        (["!", "Good"], "Hello world. "),  # the earliest match wins
        (["friends"], REPLY),  # only a prefix ever appears: held back, then released at the end
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_stop_strings(
    make_stack: Callable[..., Stack],
    model_name: str,
    model_tokenizer: ModelTokenizer,
    stop: list[str],
    text: str,
    stream: bool,
) -> None:
    stack = make_stack()
    async with asgi_client(stack) as client:
        response = await client.post(
            COMPLETIONS,
            json={
                "model": model_name,
                "prompt": "hi",
                "stop": stop,
                "stream": stream,
                "stream_options": {"include_usage": True} if stream else None,
            },
        )
    if stream:
        *chunks, last = sse_events(response.text)
        pieces = [c["choices"][0]["text"] for c in chunks]
        got, finish, usage = "".join(pieces), chunks[-1]["choices"][0]["finish_reason"], last["usage"]
        assert not any(s in p for s in stop for p in pieces)
    else:
        body = response.json()
        got, finish, usage = body["choices"][0]["text"], body["choices"][0]["finish_reason"], body["usage"]
    assert got == text
    assert finish == "stop"
    # The tokens generated up to the one that completed the stop string count; the rest never came.
    reply = model_tokenizer.encode(REPLY)
    completed = next(
        (i + 1 for i in range(len(reply)) if any(s in model_tokenizer.decode(reply[: i + 1]) for s in stop)),
        len(reply),
    )
    assert usage["completion_tokens"] == completed
    assert stack.router.last.closed_early == (completed < len(reply))


async def test_stop_string_aborts_before_the_last_delta(
    make_stack: Callable[..., Stack], model_name: str
) -> None:
    stack = make_stack()
    deltas = stack.textgen.stream(
        TextRequest(model=model_name, request_id=RequestId("req-stop"), prompt="hi", stop=["."])
    )
    async for delta in deltas:
        if delta.finish_reason is not None:
            break  # the caller has not closed the stream yet
    assert (delta.finish_reason, delta.usage) == ("stop", Usage(prompt_tokens=1, completion_tokens=3))
    assert stack.router.last.closed_early  # the request was aborted on the workers already
    await deltas.aclose()


async def test_health_and_metrics(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    async with asgi_client(stack) as client:
        ok = await client.get("/health")
        stack.health.update(ok=False, reason="no decode worker")
        down = await client.get("/health")
        metrics = await client.get("/metrics")
    assert (ok.status_code, ok.json()) == (200, {"ok": True, "prefill_workers": 1, "decode_workers": 1})
    assert (down.status_code, down.json()["reason"]) == (503, "no decode worker")
    assert metrics.status_code == 200 and metrics.text == "pdflow_up 1\n"
    assert metrics.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"


# ----------------------------------------------------------------------------- HTTP, uvicorn + openai client


async def test_openai_client_streams(
    make_stack: Callable[..., Stack], model_name: str, model_tokenizer: ModelTokenizer
) -> None:
    stack = make_stack()
    async with uvicorn_server(stack.app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        completion = await client.completions.create(
            model=model_name,
            prompt="Say hello",
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in completion]
        chat = await client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "Hi"}], stream=True, stop=["Good"]
        )
        chat_chunks = [chunk async for chunk in chat]
        whole = await client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "Hi"}]
        )
        models = await client.models.list()

    reply = model_tokenizer.encode(REPLY)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == model_tokenizer.decode(reply[:5])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    n_prompt = len(model_tokenizer.encode("Say hello"))
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (n_prompt, 5, n_prompt + 5)

    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks) == "Hello world. "
    assert chat_chunks[-1].choices[0].finish_reason == "stop"
    assert whole.choices[0].message.content == REPLY
    assert whole.usage is not None and whole.usage.completion_tokens == len(reply)
    assert [m.id for m in models.data] == [model_name]


async def test_openai_client_errors(make_stack: Callable[..., Stack], model_name: str) -> None:
    stack = make_stack(error=WorkerFailed("decode-0 died"), error_after=3)
    async with uvicorn_server(stack.app) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model=model_name, prompt="hi", max_tokens=-1)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        stream = await client.completions.create(model=model_name, prompt="hi", stream=True)
        seen: list[str] = []
        with pytest.raises(openai.APIError) as mid_stream:
            async for chunk in stream:
                seen.append(chunk.choices[0].text)
    assert bad.value.status_code == 400
    assert bad.value.body == {
        "message": "max_tokens must be at least 1; got -1.",
        "param": "max_tokens",
        "type": "invalid_request_error",
        "code": "invalid_request",
    }
    assert missing.value.status_code == 404
    assert "The model 'gpt-4o' does not exist" in missing.value.message
    assert "".join(seen) == "Hello world."
    assert mid_stream.value.message == "decode-0 died"


async def test_client_disconnect_mid_stream_aborts(make_stack: Callable[..., Stack], model_name: str) -> None:
    stack = make_stack(hang_after=2)
    async with uvicorn_server(stack.app) as url, httpx.AsyncClient(base_url=url) as client:
        request = {"model": model_name, "prompt": "hi", "stream": True}
        async with client.stream("POST", "/v1/completions", json=request) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # the client reads one piece of text and goes away
        call = stack.router.last
        await wait_for(call.done)
    assert call.closed_early and not call.aborted.is_set()


async def test_client_disconnect_while_waiting_aborts(
    make_stack: Callable[..., Stack], model_name: str
) -> None:
    stack = make_stack(hang_after=0)  # no first token yet: the client gives up during "prefill"
    async with uvicorn_server(stack.app) as url, httpx.AsyncClient(base_url=url) as client:
        for stream in (False, True):
            request = {"model": model_name, "prompt": "hi", "stream": stream}
            waiting = asyncio.create_task(client.post(COMPLETIONS, json=request))
            call = await asyncio.wait_for(stack.router.started.get(), DEADLINE_S)
            await wait_for(call.hanging)
            waiting.cancel()  # httpx closes the connection
            await wait_for(call.done)
            assert call.closed_early


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
