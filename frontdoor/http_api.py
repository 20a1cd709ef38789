"""The OpenAI-compatible HTTP API of the front door: ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (JSON or server-sent events), ``/health`` and ``/metrics``.

Every failure is an OpenAI error body ``{"error": {"message", "type", "param", "code"}}``: bad JSON and bad
fields are 400, a ``PdflowError`` gets its own ``http_status``; once a stream has started, an error is a last
``data: {"error": ...}`` event before ``data: [DONE]``. A client that goes away closes the generation, which
aborts the request on the workers: disconnects are watched with plain asyncio tasks (not anyio cancel scopes)
so the router's clean-up can still await.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from frontdoor.http_guard import Guard
from frontdoor.openai_schema import (
    ChatBody,
    CompletionBody,
    completion_prompt,
    error_body,
    error_fields,
    error_response,
    reject_unsupported,
    validation_to_invalid,
)
from frontdoor.textgen import TextDelta, TextGenerator, TextRequest, Usage
from protocol.auth import Credentials, caller_id
from protocol.errors import InvalidRequest, ModelNotFound, PdflowError, RequestTooLarge
from protocol.ids import new_request_id

log = logging.getLogger(__name__)
T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away"; nobody reads it


def build_http_app(
    textgen: TextGenerator,
    *,
    model_name: str,
    metrics_text: Callable[[], tuple[bytes, str]],
    health: Callable[[], dict[str, Any]],
    wall_clock: Callable[[], float] = time.time,
    max_body_bytes: int = 1 << 20,
    allowed_hosts: frozenset[str] | None = None,
    credentials: Credentials | None = None,
) -> FastAPI:
    """The FastAPI app of one front door. ``metrics_text()`` returns (Prometheus exposition bytes, content
    type); ``health()`` returns a JSON-able dict whose ``ok`` says whether this front door can serve (200)
    or not (503). Both are called on every scrape/probe from the event loop and must not block. With API keys
    in ``credentials``, every path but ``/health`` needs one (``/metrics`` also takes the metrics token)."""
    app = FastAPI(title="pdflow", description="OpenAI-compatible API of the pdflow front door")
    started = int(wall_clock())

    app.add_middleware(Guard, allowed_hosts=allowed_hosts, credentials=credentials or Credentials())

    @app.exception_handler(PdflowError)
    async def _pdflow_error(_: Request, err: PdflowError) -> Response:
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        body = error_body(
            f"{exc.detail}: {request.method} {request.url.path}", "invalid_request_error", None, None
        )
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        return error_response(validation_to_invalid(exc.errors()))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unexpected error in the HTTP API")
        body = error_body(f"Internal server error: {type(exc).__name__}", "internal_error", None, None)
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def _health() -> Response:
        state = health()
        return JSONResponse(state, status_code=200 if state.get("ok") is True else 503)

    @app.get("/metrics")
    async def _metrics() -> Response:
        body, content_type = metrics_text()
        return Response(body, media_type=content_type)

    def model_card() -> dict[str, Any]:
        return {
            "id": model_name,
            "object": "model",
            "created": started,
            "owned_by": "pdflow",
            "max_model_len": textgen.max_model_len,
        }

    @app.get("/v1/models")
    async def _models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def _model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise ModelNotFound(
                f"The model '{model_id}' does not exist; this server serves '{model_name}'.", param="model"
            )
        return model_card()

    @app.post("/v1/completions")
    async def _completions(request: Request) -> Response:
        body = await _parse(request, CompletionBody, max_body_bytes)
        reject_unsupported(body)
        prompt: dict[str, Any] = completion_prompt(body.prompt)
        return await _serve(request, textgen, body, prompt, _Render("text_completion", body, wall_clock))

    @app.post("/v1/chat/completions")
    async def _chat(request: Request) -> Response:
        body = await _parse(request, ChatBody, max_body_bytes)
        reject_unsupported(body)
        messages = [m.model_dump() for m in body.messages]
        return await _serve(request, textgen, body, {"messages": messages}, _Render("chat", body, wall_clock))

    return app


async def _serve(
    request: Request,
    textgen: TextGenerator,
    body: CompletionBody | ChatBody,
    prompt: dict[str, Any],
    render: _Render,
) -> Response:
    max_tokens = body.max_completion_tokens if isinstance(body, ChatBody) else None
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    req = TextRequest(
        model=body.model,
        request_id=render.request_id,
        **prompt,
        max_tokens=max_tokens if max_tokens is not None else body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=stop,
        ignore_eos=body.ignore_eos,
        priority=body.priority,
        caller=caller_id(request.headers.get("authorization")),
    )
    deltas = textgen.stream(req)
    headers = {"X-Request-Id": str(render.request_id)}
    try:
        if not body.stream:
            result = await _unless_disconnected(request.receive, _collect(deltas))
            return JSONResponse(render.whole(*result), headers=headers)
        # The first delta before the 200: validation errors and an empty pool still get their own status.
        first = await _unless_disconnected(request.receive, _first(deltas))
    except BaseException as exc:
        await deltas.aclose()  # aborts the request unless it already ended
        if isinstance(exc, _ClientGone):
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        raise
    return _EventStream(_sse_events(first, deltas, render), headers=headers)


async def _first(deltas: AsyncGenerator[TextDelta, None]) -> TextDelta:
    return await anext(deltas)


async def _collect(deltas: AsyncIterator[TextDelta]) -> tuple[str, str | None, Usage | None]:
    text: list[str] = []
    last = None
    async for last in deltas:
        text.append(last.text)
    return "".join(text), last.finish_reason if last else None, last.usage if last else None


async def _sse_events(
    first: TextDelta, deltas: AsyncGenerator[TextDelta, None], render: _Render
) -> AsyncGenerator[bytes, None]:
    try:
        for event in render.opening():
            yield _sse(event)
        delta: TextDelta | None = first
        while delta is not None:
            chunk = render.chunk(delta)
            if chunk is not None:
                yield _sse(chunk)
            if delta.finish_reason is not None:
                if render.include_usage and delta.usage is not None:
                    yield _sse(render.usage_chunk(delta.usage))
                break
            delta = await anext(deltas, None)
    except PdflowError as err:
        yield _sse({"error": error_fields(err)})
    except Exception as exc:
        log.exception("unexpected error while streaming %s", render.request_id)
        yield _sse(
            {
                "error": error_body(
                    f"Internal server error: {type(exc).__name__}", "internal_error", None, None
                )["error"]
            }
        )
    finally:
        await deltas.aclose()
    yield b"data: [DONE]\n\n"


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class _Render:
    """OpenAI response objects of one request (text completion or chat)."""

    def __init__(
        self,
        kind: Literal["text_completion", "chat"],
        body: CompletionBody | ChatBody,
        wall_clock: Callable[[], float],
    ) -> None:
        self.kind = kind
        self.request_id = new_request_id()
        self.id = f"{'cmpl' if kind == 'text_completion' else 'chatcmpl'}-{self.request_id}"
        self.created = int(wall_clock())
        self.model = body.model
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: str | None, usage: Usage | None) -> dict[str, Any]:
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
            head = self._head("chat.completion")
        else:
            choice, head = {"index": 0, "text": text}, self._head("text_completion")
        choice.update(logprobs=None, finish_reason=finish)
        return {**head, "choices": [choice], "usage": _usage(usage) if usage else None}

    def opening(self) -> list[dict[str, Any]]:
        if self.kind != "chat":
            return []
        return [self._chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})]

    def chunk(self, delta: TextDelta) -> dict[str, Any] | None:
        if not delta.text and delta.finish_reason is None:
            return None
        if self.kind == "chat":
            content = {"content": delta.text} if delta.text else {}
            return self._chunk({"delta": content, "finish_reason": delta.finish_reason})
        return self._chunk({"text": delta.text, "finish_reason": delta.finish_reason})

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return {**self._head(self._chunk_object), "choices": [], "usage": _usage(usage)}

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def _chunk(self, fields: dict[str, Any]) -> dict[str, Any]:
        event = {**self._head(self._chunk_object), "choices": [{"index": 0, **fields, "logprobs": None}]}
        if self.include_usage:
            event["usage"] = None
        return event


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


class _EventStream(StreamingResponse):
    """``text/event-stream`` whose generator is always closed: after the last event, on a client disconnect
    (seen by a receive() watcher rather than starlette's anyio cancel scope) and on any error."""

    def __init__(self, events: AsyncGenerator[bytes, None], headers: dict[str, str]) -> None:
        super().__init__(
            events, headers={**headers, "Cache-Control": "no-cache"}, media_type="text/event-stream"
        )
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            await send(start)
            await _unless_disconnected(receive, self._pump(send))
        except (_ClientGone, OSError):
            pass  # the client left: closing the events below aborts the request
        finally:
            await self._events.aclose()

    async def _pump(self, send: Send) -> None:
        async for event in self._events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _ClientGone(Exception):
    pass


async def _unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first; then cancel it (once, plain asyncio, so its
    clean-up may await) and raise ``_ClientGone``."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled() and watcher.done() and not watcher.cancelled():
        raise _ClientGone()
    return task.result()


async def _read(request: Request, limit: int) -> bytes:
    """The body, read no further than ``limit`` bytes (413 past it, before the rest is even received)."""
    too_large = RequestTooLarge(
        f"The request body is larger than this server accepts ({limit} bytes). Send a shorter prompt."
    )
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, model: type[BaseModel], limit: int) -> Any:
    raw = await _read(request, limit)
    try:
        data = json.loads(raw)
        json.dumps(data, ensure_ascii=False).encode()  # a lone surrogate ("\ud800") is no text
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc}. The API expects a JSON object."
        ) from exc
    except UnicodeEncodeError:
        raise InvalidRequest(
            "The request body holds a lone UTF-16 surrogate (an escape in \\ud800-\\udfff without its "
            "pair), which is not text. Send valid Unicode."
        ) from None
    except RecursionError:
        raise InvalidRequest("The JSON body of your request nests too deeply to be a request.") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}.") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"The request body must be a JSON object, not {type(data).__name__}.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_to_invalid(exc.errors()) from exc
