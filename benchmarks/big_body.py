"""A 50 MB request body against the front door's HTTP server while another request streams: how fast the
big one is refused (413), and whether the stream stalls meanwhile. The front door is the real one (its
FastAPI app under uvicorn with its HTTP protocol, the real tokenizer), on a token router that streams a token
every 20 ms (no engines: what is measured is the front door's own event loop), in a process of its own; the
big body goes from another thread here, as another client's would.

    .venv/bin/python benchmarks/big_body.py [--megabytes 50]

Two ways to send it: with its Content-Length (refused from the header, before the body is read) and chunked
(refused once 1 MiB has been read). Prints the refusal time of each and the stream's longest gap between
tokens, against the gap of the same stream with no big body beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from frontdoor.http_api import build_http_app  # noqa: E402
from frontdoor.http_guard import http_protocol  # noqa: E402
from frontdoor.textgen import TextGenerator  # noqa: E402
from frontdoor.tokenizer import ModelTokenizer  # noqa: E402
from pdctl.local_cluster import free_port  # noqa: E402
from pdctl.model_cache import MODEL_NAME, prepare_model  # noqa: E402
from protocol.ids import RequestId  # noqa: E402
from protocol.messages import FinishReason, SamplingSpec, TokenChunk  # noqa: E402

TOKEN_EVERY_S = 0.02


class PacedRouter:
    """Streams token 42 every 20 ms, ``max_tokens`` of them."""

    async def generate(
        self,
        request_id: RequestId,
        prompt_token_ids: tuple[int, ...],
        sampling: SamplingSpec,
        priority: int = 0,
    ) -> AsyncIterator[TokenChunk]:
        for i in range(sampling.max_tokens):
            await asyncio.sleep(TOKEN_EVERY_S)
            last = i == sampling.max_tokens - 1
            yield TokenChunk(request_id, (42,), FinishReason.LENGTH if last else None)

    def stopped(self, request_id: RequestId) -> None:
        pass

    async def abort(self, request_id: RequestId) -> bool:
        return False


async def stream_gaps(url: str, tokens: int) -> list[float]:
    """Stream a completion; the gaps between its events."""
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": tokens, "stream": True, "ignore_eos": True}
    gaps, last = [], None
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", f"{url}/v1/completions", json=body) as r,
    ):
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)
                last = now
    return gaps


def big_post(url: str, size: int, chunked: bool) -> tuple[int, float]:
    """POST a body of ``size`` bytes (on its own thread, as another client would): (status, seconds)."""
    payload = b'{"model": "m", "prompt": "' + b"x" * size + b'"}'

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(payload), 1 << 20):
            yield payload[start : start + (1 << 20)]

    started = time.monotonic()
    try:
        content = pieces() if chunked else payload
        response = httpx.post(f"{url}/v1/completions", content=content, timeout=60,
                              headers={"content-type": "application/json"})  # fmt: skip
        status = response.status_code
    except httpx.HTTPError:  # the server may close the connection on the rest of the body
        status = -1
    return status, time.monotonic() - started


def serve(port: int) -> None:
    """The front door's HTTP server on ``port``, in this (child) process."""
    tokenizer = ModelTokenizer(str(prepare_model()))
    textgen = TextGenerator(PacedRouter(), tokenizer, MODEL_NAME, 2048, 16)  # type: ignore[arg-type]
    app = build_http_app(textgen, model_name=MODEL_NAME, metrics_text=lambda: (b"", "text/plain"),
                         health=lambda: {"ok": True})  # fmt: skip
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                            http=http_protocol())  # fmt: skip
    uvicorn.Server(config).run()


async def main(args: argparse.Namespace) -> None:
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(port,), daemon=True)
    server.start()  # a process of its own: the clients here take nothing from its event loop or its GIL
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(f"{url}/health", timeout=1)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "the server did not start"
            await asyncio.sleep(0.2)
    alone = await stream_gaps(url, 150)
    print(f"stream alone: longest gap between tokens {max(alone) * 1000:.0f} ms")
    size = args.megabytes << 20
    for chunked in (False, True):
        stream = asyncio.create_task(stream_gaps(url, 150))
        await asyncio.sleep(0.5)
        status, took = await asyncio.to_thread(big_post, url, size, chunked)
        gaps = await stream
        how = "chunked" if chunked else "with Content-Length"
        beside = f"the stream beside it: longest gap {max(gaps) * 1000:.0f} ms, {len(gaps) + 1} events"
        print(f"{args.megabytes} MB body {how}: HTTP {status} in {took * 1000:.0f} ms; {beside}")
    server.terminate()
    server.join(timeout=10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--megabytes", type=int, default=50)
    asyncio.run(main(parser.parse_args()))
