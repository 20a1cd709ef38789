"""The harness of the API-layer tests: a scripted token router standing in for the worker pools (it
yields given token ids and records what it was asked and whether its stream was closed before the end, which
is how the real router aborts), the stack built on it, and clients for ASGI, uvicorn and gRPC."""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import uvicorn
from fastapi import FastAPI

from frontdoor.grpc_api import start_grpc_server
from frontdoor.textgen import TextGenerator
from protocol.errors import PdflowError
from protocol.ids import RequestId
from protocol.messages import FinishReason, SamplingSpec, TokenChunk

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

    def stopped(self, request_id: RequestId) -> None:
        pass  # a stop string's finish: nothing to record here

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
async def uvicorn_server(app: FastAPI, **options: Any) -> AsyncIterator[str]:
    """A real uvicorn server on 127.0.0.1 and a free port (``options``: more of ``uvicorn.Config``, such as
    TLS files); yields its base URL."""
    server = _Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=2,
            **options,
        )
    )
    serving = asyncio.create_task(server.serve())
    ready = asyncio.create_task(server.ready.wait())
    await asyncio.wait((serving, ready), timeout=DEADLINE_S, return_when=asyncio.FIRST_COMPLETED)
    assert server.ready.is_set(), "uvicorn did not start"
    try:
        scheme = "https" if options.get("ssl_certfile") else "http"
        yield f"{scheme}://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
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


def api_app(textgen: TextGenerator, **options: Any) -> FastAPI:
    """The front door's HTTP app on ``textgen``, healthy, with a one-line /metrics page; ``options``: more
    of ``build_http_app``'s (credentials, allowed hosts)."""
    from frontdoor.http_api import build_http_app

    return build_http_app(
        textgen,
        model_name=textgen.model_name,
        health=lambda: {"ok": True},
        metrics_text=lambda: (b"pdflow_up 1\n", "text/plain"),
        **options,
    )


def sse_events(body: str) -> list[Any]:
    """Parse an SSE body strictly: only ``data: ...`` events separated by blank lines, ending with [DONE]."""
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), body
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


async def wait_for(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), DEADLINE_S)
