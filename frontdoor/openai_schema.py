"""The OpenAI API's request bodies as this server reads them, and what it answers when they are wrong: the
pydantic models (unknown fields ignored, as vLLM does; known ones it cannot honour refused by name), the
turn of a validation error into an OpenAI-style message, and the error body every failure gets
(``{"error": {"message", "type", "param", "code"}}``)."""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from protocol.errors import InvalidRequest, PdflowError


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None


class _SamplingBody(BaseModel):
    # Unknown fields are ignored (as vLLM does); known ones this server cannot honour are rejected below.
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # vLLM extension
    priority: int = 0  # vLLM extension, passed to the router unchanged
    user: str | None = None


class CompletionBody(_SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = None
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class ChatBody(_SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


_UNION_FIELDS = {
    "prompt": "a string, a list of one string, or a list of token ids",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
}


def validation_to_invalid(errors: Any) -> InvalidRequest:
    first = errors[0]
    path = [str(p) for p in first["loc"] if p != "body"]
    # A union field reports one error per member type (loc carries the type's name): say what fits instead.
    field = next((p for p in path if p in _UNION_FIELDS), None)
    if first["type"] == "missing":
        param = ".".join(path)
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    if field is not None:
        param = ".".join(path[: path.index(field) + 1])
        return InvalidRequest(f"Invalid type for '{param}': expected {_UNION_FIELDS[field]}.", param=param)
    param = ".".join(path)
    return InvalidRequest(f"Invalid value for '{param}': {first['msg']}.", param=param or None)


def reject_unsupported(body: CompletionBody | ChatBody) -> None:
    unsupported: list[tuple[str, bool]] = [
        ("n", body.n not in (None, 1)),
        ("presence_penalty", body.presence_penalty not in (None, 0.0)),
        ("frequency_penalty", body.frequency_penalty not in (None, 0.0)),
        ("logit_bias", bool(body.logit_bias)),
    ]
    if isinstance(body, CompletionBody):
        unsupported += [
            ("best_of", body.best_of not in (None, 1)),
            ("logprobs", body.logprobs is not None),
            ("echo", bool(body.echo)),
            ("suffix", bool(body.suffix)),
        ]
    else:
        rf = (body.response_format or {}).get("type", "text")
        unsupported += [
            ("logprobs", bool(body.logprobs)),
            ("top_logprobs", body.top_logprobs is not None),
            ("tools", bool(body.tools)),
            ("response_format", rf != "text"),
        ]
    for param, bad in unsupported:
        if bad:
            raise InvalidRequest(
                f"'{param}' is not supported by this server{' (only n=1)' if param == 'n' else ''}.",
                param=param,
            )


def completion_prompt(prompt: str | list[str] | list[int] | list[list[int]]) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if not prompt:
        return {"prompt": ""}
    if len(prompt) > 1 and not isinstance(prompt[0], int):
        raise InvalidRequest(
            "Batched prompts (a list of several prompts) are not supported; send one prompt per request.",
            param="prompt",
        )
    only = prompt[0]
    if isinstance(only, str):
        return {"prompt": only}
    if isinstance(only, list):
        return {"prompt_token_ids": only}
    return {"prompt_token_ids": prompt}


def error_body(message: str, error_type: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_fields(err: PdflowError) -> dict[str, Any]:
    code = re.sub(r"(?<!^)(?=[A-Z])", "_", type(err).__name__).lower()
    return error_body(err.message, err.error_type, err.param, code)["error"]


def error_response(err: PdflowError) -> JSONResponse:
    """The OpenAI error body and status of a ``PdflowError`` (and ``Retry-After`` when it says when)."""
    retry_after = getattr(err, "retry_after_s", None)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": error_fields(err)}, status_code=err.http_status, headers=headers)
