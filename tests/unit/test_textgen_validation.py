"""What ``TextGenerator`` accepts and how it refuses the rest: the message a client reads, the ``param`` it
names and the status it maps to; and what a valid request turns into (prompt ids, sampling spec)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from frontdoor.textgen import TextGenerator, TextRequest
from frontdoor.tokenizer import ModelTokenizer
from protocol.errors import InvalidRequest, ModelNotFound
from protocol.ids import RequestId
from protocol.messages import SamplingSpec, TokenChunk

CONTEXT = 64
DEFAULT_MAX_TOKENS = 16


class UnreachableRouter:
    """Validation failures must never reach the workers."""

    def generate(
        self,
        request_id: RequestId,
        prompt_token_ids: tuple[int, ...],
        sampling: SamplingSpec,
        priority: int = 0,
    ) -> AsyncIterator[TokenChunk]:
        raise AssertionError(f"an invalid request reached the router: {request_id}")

    async def abort(self, request_id: RequestId) -> bool:
        return False

    def stopped(self, request_id: RequestId) -> None:
        raise AssertionError(f"an invalid request reached the router: {request_id}")


@pytest.fixture
def textgen(model_tokenizer: ModelTokenizer, model_name: str) -> TextGenerator:
    return TextGenerator(UnreachableRouter(), model_tokenizer, model_name, CONTEXT, DEFAULT_MAX_TOKENS)


def request(model_name: str, **fields: Any) -> TextRequest:
    if not {"prompt", "messages", "prompt_token_ids"} & fields.keys():
        fields["prompt"] = "Hello"
    return TextRequest(model=model_name, request_id=RequestId("req-test"), **fields)


def refuse(textgen: TextGenerator, req: TextRequest) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        textgen.prepare(req)
    return info.value


async def test_unknown_model_is_404_naming_the_served_model(textgen: TextGenerator, model_name: str) -> None:
    err = refuse(textgen, TextRequest(model="gpt-4", request_id=RequestId("r"), prompt="hi"))
    assert isinstance(err, ModelNotFound)
    assert (err.http_status, err.grpc_code, err.param) == (404, "NOT_FOUND", "model")
    assert err.message == f"The model 'gpt-4' does not exist; this server serves '{model_name}'."


LONG = list(range(100, 100 + CONTEXT))


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"prompt": ""}, "prompt", "The prompt is empty; give at least one character."),
        ({"messages": []}, "messages", "'messages' is empty; give at least one message."),
        (
            {"prompt_token_ids": []},
            "prompt",
            "The prompt's token id list is empty; give at least one token id.",
        ),
        (
            {"prompt_token_ids": [5, 49152]},
            "prompt",
            "Token id 49152 is out of vocabulary; this model's token ids are 0 to 49151.",
        ),
        ({"prompt_token_ids": [-1]}, "prompt", "Token id -1 is out of vocabulary"),
        (
            {"prompt": "a", "prompt_token_ids": [5]},
            "prompt",
            "Exactly one of 'prompt', 'messages' or 'prompt_token_ids' must be given; got prompt, "
            "prompt_token_ids.",
        ),
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be at least 1; got 0."),
        ({"max_tokens": -5}, "max_tokens", "max_tokens must be at least 1; got -5."),
        (
            {"prompt_token_ids": LONG},
            "prompt",
            f"This model's maximum context length is {CONTEXT} tokens. "
            f"However, you requested {CONTEXT} tokens in "
            "the prompt, which leaves no room for a completion. Please reduce the length of the prompt.",
        ),
        (
            {"prompt_token_ids": [*LONG, 7]},
            "prompt",
            f"However, you requested {CONTEXT + 1} tokens in the prompt",
        ),
        (
            {"prompt_token_ids": LONG[:60], "max_tokens": 5},
            "max_tokens",
            f"This model's maximum context length is {CONTEXT} tokens. "
            f"However, you requested 65 tokens (60 in the "
            "prompt, 5 in the completion). Please reduce the length of the prompt or completion.",
        ),
        (
            {"messages": [{"role": "user", "content": "word " * 80}]},
            "messages",
            "tokens in the prompt, which leaves no room for a completion. Please reduce the length of the "
            "messages.",
        ),
        ({"temperature": -0.1}, "temperature", "temperature must be between 0 and 2; got -0.1."),
        ({"temperature": 2.5}, "temperature", "temperature must be between 0 and 2; got 2.5."),
        ({"temperature": math.nan}, "temperature", "temperature must be between 0 and 2"),
        ({"top_p": 0.0}, "top_p", "top_p must be greater than 0 and at most 1; got 0.0."),
        ({"top_p": 1.5}, "top_p", "top_p must be greater than 0 and at most 1; got 1.5."),
        ({"top_k": -2}, "top_k", "top_k must be -1 or 0 (disabled) or a positive number; got -2."),
        ({"seed": 2**64}, "seed", "seed must fit in a signed 64-bit integer"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "At most 4 stop sequences are supported; got 5."),
        ({"stop": [""]}, "stop", "Stop sequences must be non-empty strings."),
        (
            {"messages": [{"role": "wizard", "content": "hi"}]},
            "messages[0].role",
            "messages[0].role must be one of assistant, developer, system, tool, user; got 'wizard'.",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": 3}]},
            "messages[1].content",
            "messages[1].content must be a string or a list of text parts; got int.",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
            "messages[0].content",
            "only text parts",
        ),
        ({"messages": ["hello"]}, "messages[0]", "messages[0] must be an object with 'role' and 'content'."),
    ],
)
async def test_bad_request_is_refused(
    textgen: TextGenerator, model_name: str, fields: dict[str, Any], param: str, message: str
) -> None:
    err = refuse(textgen, request(model_name, **fields))
    assert type(err) is InvalidRequest
    assert (err.http_status, err.grpc_code) == (400, "INVALID_ARGUMENT")
    assert err.error_type == "invalid_request_error"
    assert err.param == param
    assert err.message.startswith(message) or message in err.message, err.message


async def test_stream_refuses_before_reaching_the_router(textgen: TextGenerator, model_name: str) -> None:
    with pytest.raises(InvalidRequest, match="max_tokens must be at least 1"):
        async for _ in textgen.stream(request(model_name, max_tokens=0)):
            pass


async def test_default_max_tokens_is_capped_by_the_context(textgen: TextGenerator, model_name: str) -> None:
    short = textgen.prepare(request(model_name, prompt_token_ids=[5, 6, 7]))
    assert short.sampling.max_tokens == DEFAULT_MAX_TOKENS
    near_full = textgen.prepare(request(model_name, prompt_token_ids=LONG[:60]))
    assert near_full.sampling.max_tokens == CONTEXT - 60
    exact = textgen.prepare(request(model_name, prompt_token_ids=LONG[:60], max_tokens=4))
    assert exact.sampling.max_tokens == 4


async def test_valid_request_becomes_prompt_ids_and_sampling(
    textgen: TextGenerator, model_name: str, model_tokenizer: ModelTokenizer
) -> None:
    prepared = textgen.prepare(
        request(
            model_name,
            prompt="Once upon a time",
            max_tokens=8,
            temperature=0.0,
            top_p=0.9,
            top_k=-1,
            seed=42,
            stop=["\n"],
            ignore_eos=True,
            priority=3,
        )
    )
    assert prepared.prompt_token_ids == tuple(model_tokenizer.encode("Once upon a time"))
    assert prepared.sampling == SamplingSpec(
        max_tokens=8, temperature=0.0, top_p=0.9, top_k=0, seed=42, ignore_eos=True
    )
    assert prepared.sampling.greedy
    assert (prepared.stop, prepared.priority, prepared.request_id) == (("\n",), 3, "req-test")


async def test_seed_is_passed_only_when_the_client_gives_one(textgen: TextGenerator, model_name: str) -> None:
    # The decode worker continues after the prefill's first token, so no shared seed is needed; and a seed
    # costs vLLM CPU a per-request generator.
    assert textgen.prepare(request(model_name)).sampling.seed is None
    assert textgen.prepare(request(model_name, seed=-3)).sampling.seed == -3


async def test_chat_prompt_uses_the_model_template(
    textgen: TextGenerator, model_name: str, model_tokenizer: ModelTokenizer
) -> None:
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
    prepared = textgen.prepare(request(model_name, messages=[{"role": "user", "content": parts}]))
    expected = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    )
    assert model_tokenizer.decode(prepared.prompt_token_ids) == expected.replace("<|im_start|>", "").replace(
        "<|im_end|>", ""
    )
    assert prepared.prompt_token_ids[0] == 1  # <|im_start|>, written by the template, not added twice
    assert prepared.prompt_token_ids.count(1) == 3


async def test_tokenizer_without_chat_template_refuses_messages(model_dir: Path, model_name: str) -> None:
    bare = ModelTokenizer(model_dir)
    bare._hf.chat_template = None  # a base model: no template shipped
    textgen = TextGenerator(UnreachableRouter(), bare, model_name, CONTEXT, DEFAULT_MAX_TOKENS)
    err = refuse(textgen, request(model_name, messages=[{"role": "user", "content": "hi"}]))
    assert err.param == "messages"
    assert err.message.startswith("This model's tokenizer has no chat template")


def test_a_text_no_tokenization_could_fit_is_refused_before_tokenizing(
    textgen: TextGenerator, model_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 50 MB prompt used to be tokenized on the event loop for a minute and a half before its 400."""

    def tokenized(*_: Any) -> list[int]:
        raise AssertionError("the text was tokenized")

    monkeypatch.setattr(textgen.tokenizer, "encode", tokenized)
    monkeypatch.setattr(textgen.tokenizer, "apply_chat_template", tokenized)
    limit = CONTEXT * textgen.tokenizer.max_token_chars
    err = refuse(textgen, request(model_name, prompt="a" * (limit + 1)))
    assert err.param == "prompt"
    assert err.message == (
        f"This model's maximum context length is {CONTEXT} tokens, which no text of more than {limit} "
        f"characters fits; your prompt has {limit + 1}. Please reduce its length."
    )
    long_chat = [{"role": "user", "content": "a" * limit}, {"role": "user", "content": "b"}]
    assert refuse(textgen, request(model_name, messages=long_chat)).param == "messages"
    # thousands of empty messages: the template's own text around each counts
    empty = [{"role": "user", "content": ""}] * (limit // 32 + 1)
    assert refuse(textgen, request(model_name, messages=empty)).param == "messages"


async def test_a_long_text_is_tokenized_off_the_event_loop(
    model_tokenizer: ModelTokenizer, model_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a long prompt is tokenized, every other stream of the front door goes on."""
    import threading

    textgen = TextGenerator(UnreachableRouter(), model_tokenizer, model_name, 4096, DEFAULT_MAX_TOKENS)
    threads: list[int] = []

    def encode(text: str) -> list[int]:
        threads.append(threading.get_ident())
        return [1] * 8

    monkeypatch.setattr(model_tokenizer, "encode", encode)
    loop_thread = threading.get_ident()
    for prompt in ("short", "x" * 20_000):  # max_tokens 4096 leaves no room: refused after tokenizing
        with pytest.raises(InvalidRequest, match="maximum context length"):
            await anext(textgen.stream(request(model_name, prompt=prompt, max_tokens=4096)))
    assert threads[0] == loop_thread  # a short prompt: inline, it costs microseconds
    assert threads[1] != loop_thread


def test_content_parts_count_by_their_text(textgen: TextGenerator, model_name: str) -> None:
    """Not by the length of their repr: short parts are tokenized, and refused by their tokens only."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}] * 3}] * 3
    err = refuse(textgen, request(model_name, messages=parts, max_tokens=CONTEXT))
    assert err.message.startswith(f"This model's maximum context length is {CONTEXT} tokens. However")
