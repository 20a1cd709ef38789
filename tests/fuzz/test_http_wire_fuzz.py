"""Hostile bytes on the wire, to a real uvicorn server with the front door's HTTP protocol (what
``FrontDoor`` runs): 2,000 of the seeded cases (``cases.py``) written as raw HTTP/1.1, lying
``Content-Length``s included, and 500 requests the HTTP parser itself must refuse (bad request lines, bad
headers, invalid lengths, binary garbage). No answer is a 5xx, every error (the parser's own 400 included)
is an OpenAI error body, and the server still serves afterwards."""

from __future__ import annotations

import asyncio
import collections
import json
import random
from typing import Any

import pytest

from frontdoor.http_guard import http_protocol
from tests.fuzz.cases import http_cases
from tests.fuzz.conftest import API_KEY
from tests.integration.api_harness import uvicorn_server

pytestmark = pytest.mark.integration
CASES, PARSER_CASES = 2_000, 500
DEADLINE_S = 10.0


def _parser_case(rng: random.Random) -> bytes:
    """A request the HTTP parser refuses (or, at best, passes on with something odd in it)."""
    good_head = b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
    return rng.choice(
        [
            b"GARBAGE\r\n\r\n",
            b"GET / HTTP/9.9\r\nhost: 127.0.0.1\r\n\r\n",
            b"GET /\x00 HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n",
            b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n",
            good_head + b"content-length: -1\r\n\r\n{}",
            good_head + b"content-length: 1e3\r\n\r\n{}",
            good_head + b"content-length: 2\r\ncontent-length: 3\r\n\r\n{}",
            good_head + b"transfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
            good_head + b"transfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            good_head + b"x-bad header: 1\r\ncontent-length: 2\r\n\r\n{}",
            good_head + b"x-long: " + b"v" * 100_000 + b"\r\ncontent-length: 2\r\n\r\n{}",
            good_head + b"x-ctl: a\x01b\r\ncontent-length: 2\r\n\r\n{}",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(64),  # a TLS hello to plain text
            rng.randbytes(rng.randint(1, 200)) + b"\r\n\r\n",
        ]
    )


def _raw(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", "connection: close"]
    if "content-length" not in headers:
        lines.append(f"content-length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


async def _exchange(port: int, request: bytes, *, end: bool = False) -> bytes:
    """Send ``request`` on a fresh connection; everything the server sent back before closing it. ``end``:
    close the sending side after it (a body shorter than its Content-Length ends there; a server takes the
    end of a well-formed request for the client going away)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        if end:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), DEADLINE_S)
    except (ConnectionResetError, BrokenPipeError):
        return b""  # the server hung up on it (it sent its answer first, or had none to give)
    finally:
        writer.close()


def _problem(answer: bytes, request: bytes) -> str | None:
    if not answer:
        return None  # dropped without an answer: the client learns nothing, the server loses nothing
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status >= 500:
        return f"{status}: {answer[:300]!r}"
    if status >= 400 and not request.startswith(b"HEAD "):  # the answer to HEAD has no body
        try:
            error = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            return f"{status} without an OpenAI error body: {answer[:300]!r}"
        if set(error) != {"message", "type", "param", "code"}:
            return f"{status} with a malformed error body: {error}"
    return None


async def test_hostile_bytes_on_the_wire_get_no_5xx_and_openai_errors(app: Any, model_name: str) -> None:
    rng = random.Random(5)
    statuses: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    key = {"authorization": f"Bearer {API_KEY}"}
    async with uvicorn_server(app, http=http_protocol()) as url:
        port = int(url.rsplit(":", 1)[1])
        requests = [
            (
                case.describe(),
                _raw(case.method, case.path, {**case.headers, **key}, case.body),
                case.headers.get("content-length", str(len(case.body))) != str(len(case.body)),
            )
            for case in http_cases(CASES, model_name, seed=99)
        ]
        requests += [(f"parser case {i}", _parser_case(rng), True) for i in range(PARSER_CASES)]
        for what, request, lying in requests:
            answer = await _exchange(port, request, end=lying)
            statuses[answer.split(b" ", 2)[1].decode() if answer else "dropped"] += 1
            if (problem := _problem(answer, request)) is not None:
                problems.append(f"{what} -> {problem}")
        body = json.dumps({"model": model_name, "prompt": "Hi", "max_tokens": 3}).encode()
        after = await _exchange(
            port, _raw("POST", "/v1/completions", {**key, "content-type": "application/json"}, body)
        )
    assert not problems, f"{len(problems)} of {len(requests)}:\n" + "\n".join(problems[:20])
    assert after.startswith(b"HTTP/1.1 200")
    assert statuses["400"] > PARSER_CASES // 2 and statuses["200"] > 50, statuses
    print(f"\n{len(requests)} requests on the wire: {dict(statuses)}")
