"""The OpenAI HTTP API served by a real uvicorn server, read by the official ``openai`` client: streams,
errors, and client disconnects that abort the request."""

import asyncio
import json
from collections.abc import Callable

import httpx
import openai
import pytest

from frontdoor.tokenizer import ModelTokenizer
from protocol.errors import WorkerFailed
from tests.integration.api_harness import (
    COMPLETIONS,
    DEADLINE_S,
    REPLY,
    Stack,
    uvicorn_server,
    wait_for,
)

pytestmark = pytest.mark.integration


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
