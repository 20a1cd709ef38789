"""Bad requests to the OpenAI HTTP API, JSON and streaming alike: each gets its HTTP status and an
OpenAI-style error body naming the offending parameter, and reaches no worker."""

import json
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.api_harness import (
    CHAT,
    COMPLETIONS,
    CONTEXT,
    Stack,
    asgi_client,
)

pytestmark = pytest.mark.integration


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
    # hostile bodies that used to get a 500 or no answer at all
    (
        COMPLETIONS,
        b"[" * 100_000 + b"]" * 100_000,
        400,
        "The JSON body of your request nests too deeply",
        None,
    ),
    (
        COMPLETIONS,
        b'{"model": "M", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
        400,
        "We could not parse the JSON body of your request: Exceeds the limit (4300 digits)",
        None,
    ),
    (
        COMPLETIONS,
        b'{"model": "M", "prompt": "\\ud800"}',
        400,
        "The request body holds a lone UTF-16 surrogate",
        None,
    ),
    (
        CHAT,
        b'{"model": "\\udfff", "messages": []}',
        400,
        "The request body holds a lone UTF-16 surrogate",
        None,
    ),
    (COMPLETIONS, b'{"model": "M", "prompt": "\xff\xfe"}', 400, "We could not parse the JSON body", None),
    (
        COMPLETIONS,
        {"model": M, "prompt": "a" * (1 << 20)},
        413,
        "The request body is larger than this server accepts (1048576 bytes)",
        None,
    ),
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
    assert error["code"] == {404: "model_not_found", 413: "request_too_large"}.get(status, "invalid_request")
    assert stack.router.calls == []


async def test_a_large_body_sent_without_its_length_is_cut_off_at_the_limit(
    make_stack: Callable[..., Stack],
) -> None:
    """Chunked, with no Content-Length: the server stops reading at the limit and answers 413."""
    sent = 0

    async def chunks() -> Any:
        nonlocal sent
        yield b'{"model": "m", "prompt": "'
        for _ in range(64):  # 4 MiB in all
            sent += 1
            yield b"a" * (64 << 10)
        yield b'"}'

    stack = make_stack()
    async with asgi_client(stack) as client:
        response = await client.post(
            COMPLETIONS, content=chunks(), headers={"content-type": "application/json"}
        )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    assert stack.router.calls == []


async def test_a_model_path_that_is_not_text_is_a_404_not_a_500(make_stack: Callable[..., Stack]) -> None:
    async with asgi_client(make_stack()) as client:
        response = await client.get("/v1/models/%ED%A0%80")
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"


async def test_a_page_cannot_post_to_a_local_server_as_a_simple_request(
    make_stack: Callable[..., Stack],
) -> None:
    """A browser sends text/plain and form posts cross-origin without asking: they get 415, not a
    completion spent on someone else's behalf."""
    stack = make_stack()
    async with asgi_client(stack) as client:
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            response = await client.post(
                COMPLETIONS, content=b'{"model": "m"}', headers={"content-type": kind}
            )
            assert response.status_code == 415, (kind, response.text)
            assert response.json()["error"]["code"] == "unsupported_media_type"
        ok = await client.post(
            COMPLETIONS, content=b"{}", headers={"content-type": "application/json; charset=utf-8"}
        )
        assert ok.status_code == 400  # through to the JSON checks
    assert stack.router.calls == []


def _loopback_app(model_tokenizer: Any, model_name: str) -> Any:
    from frontdoor.http_api import build_http_app
    from frontdoor.http_guard import local_names
    from frontdoor.textgen import TextGenerator
    from tests.integration.api_harness import CONTEXT, DEFAULT_MAX_TOKENS, REPLY, ScriptedRouter

    router = ScriptedRouter(model_tokenizer.encode(REPLY))
    textgen = TextGenerator(router, model_tokenizer, model_name, CONTEXT, DEFAULT_MAX_TOKENS)
    return build_http_app(
        textgen,
        model_name=model_name,
        health=lambda: {"ok": True},
        metrics_text=lambda: (b"", "text/plain"),
        allowed_hosts=local_names("127.0.0.1"),
    )


async def test_on_loopback_only_local_names_are_served(model_tokenizer: Any, model_name: str) -> None:
    """DNS rebinding gives a page a name of its own for 127.0.0.1: that name gets 421."""
    import httpx

    from frontdoor.http_guard import local_names

    assert local_names("0.0.0.0") is None and local_names("10.1.2.3") is None  # a pod's address: any name
    transport = httpx.ASGITransport(app=_loopback_app(model_tokenizer, model_name))
    cases = [
        ({"host": "127.0.0.1:8000"}, 200),
        ({"host": "LOCALHOST"}, 200),
        ({"host": "[::1]"}, 200),
        ({"host": "[::1]:8000"}, 200),
        ({"host": "localhost."}, 200),
        ({"host": "evil.example"}, 421),
        ({"host": "evil.example:8000"}, 421),
    ]
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        for headers, status in cases:
            response = await client.get("/v1/models", headers=headers)
            assert response.status_code == status, (headers, response.text)
    assert response.json()["error"]["message"] == (
        "This server answers to 127.0.0.1, ::1, localhost, not 'evil.example'."
    )


async def test_a_local_server_refuses_what_another_sites_page_sends(
    model_tokenizer: Any, model_name: str
) -> None:
    """A fetch with no content type, or a beacon, needs no permission from the browser: its Origin (or
    Sec-Fetch-Site) gives it away."""
    import httpx

    transport = httpx.ASGITransport(app=_loopback_app(model_tokenizer, model_name))
    body = json.dumps({"model": model_name, "prompt": "hi", "max_tokens": 2}).encode()
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost:8000") as client:
        for headers in (
            {"origin": "https://evil.example"},
            {"origin": "null"},
            {"sec-fetch-site": "cross-site"},
        ):
            response = await client.post(COMPLETIONS, content=body, headers=headers)
            assert response.status_code == 403, (headers, response.text)
            assert response.json()["error"]["code"] == "cross_site"
        for headers in ({"origin": "http://localhost:3000"}, {"sec-fetch-site": "same-origin"}, {}):
            response = await client.post(COMPLETIONS, content=body, headers=headers)
            assert response.status_code == 200, (headers, response.text)
