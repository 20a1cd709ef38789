"""The OpenAI HTTP API over the scripted router: in-process via ASGI, and a real uvicorn server read by the
official ``openai`` client."""

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from frontdoor.textgen import TextRequest, Usage
from frontdoor.tokenizer import ModelTokenizer
from protocol.errors import PoolEmpty, WorkerFailed
from protocol.ids import RequestId
from protocol.messages import SamplingSpec
from tests.integration.api_harness import (
    CHAT,
    COMPLETIONS,
    CONTEXT,
    DEADLINE_S,
    REPLY,
    Stack,
    asgi_client,
    sse_events,
    uvicorn_server,
    wait_for,
)

pytestmark = pytest.mark.integration


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
