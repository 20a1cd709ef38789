"""The OpenAI HTTP API over the scripted router, in-process via ASGI: models, completions and chat (JSON and
server-sent events), router errors, stop strings, health and metrics. (Bad requests:
``test_http_bad_requests.py``; the official ``openai`` client on a real server:
``test_http_openai_client.py``.)"""

from collections.abc import Callable
from typing import Any

import pytest

from frontdoor.textgen import TextRequest, Usage
from frontdoor.tokenizer import ModelTokenizer
from protocol.errors import Overloaded, PoolEmpty, WorkerFailed
from protocol.ids import RequestId
from protocol.messages import SamplingSpec
from tests.integration.api_harness import (
    CHAT,
    COMPLETIONS,
    CONTEXT,
    REPLY,
    Stack,
    asgi_client,
    sse_events,
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


@pytest.mark.parametrize("stream", [False, True])
async def test_an_overloaded_server_answers_429_with_retry_after(
    make_stack: Callable[..., Stack], model_name: str, stream: bool
) -> None:
    stack = make_stack(error=Overloaded("The server is overloaded", retry_after_s=1))
    async with asgi_client(stack) as client:
        response = await client.post(COMPLETIONS, json={"model": model_name, "prompt": "x", "stream": stream})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert response.json()["error"]["code"] == "overloaded"


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
