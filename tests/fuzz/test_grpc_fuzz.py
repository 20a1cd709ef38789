"""5,000 hostile calls to the gRPC Router on the scripted router, API keys on: random bytes as requests,
requests whose every field is hostile (request ids up to 4 MB, NaN and infinite sampling values, token ids
past the vocabulary, thousands of stop strings, odd chat roles), and aborts of ids nobody made. None ends
with a status that means the server failed (INTERNAL, UNKNOWN, DATA_LOSS), and the server still serves."""

from __future__ import annotations

import collections
import math
import random
from typing import Any

import grpc
import pytest

from frontdoor.grpc_api import start_grpc_server
from frontdoor.textgen import TextGenerator
from protocol.proto import router_pb2
from tests.fuzz.cases import json_value
from tests.fuzz.conftest import API_KEY, CREDENTIALS

pytestmark = pytest.mark.integration
CASES = 5_000
GENERATE, ABORT = "/pdflow.v1.Router/Generate", "/pdflow.v1.Router/Abort"
SERVER_FAILED = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
MAX_MESSAGE = 4 << 20  # gRPC's default: a larger request is RESOURCE_EXHAUSTED before pdflow sees it


def _text(rng: random.Random, short: bool = False) -> str:
    roll = rng.random() * (0.8 if short else 1.0)
    if roll < 0.5:
        return "".join(
            chr(rng.choice([rng.randint(32, 126), rng.randint(0, 0xD7FF)])) for _ in range(rng.randint(0, 40))
        )
    if roll < 0.8:
        return rng.choice(["", "\x00", "a/b", "../..", " ", "id with spaces", "é", "<|im_start|>", "x" * 129])
    if roll < 0.995:
        return "z" * rng.choice([200, 5_000, 70_000])
    return "q" * rng.choice([1 << 20, MAX_MESSAGE - 64, MAX_MESSAGE + 1024])  # up to and past 4 MB


def _float(rng: random.Random) -> float:
    return rng.choice([math.nan, math.inf, -math.inf, -1.0, 0.0, 1e-45, 2.0, 3.5, 1e38, rng.uniform(-5, 5)])


def _int(rng: random.Random, bits: int) -> int:
    top = 2 ** (bits - 1)
    return rng.choice([-top, -1, 0, 1, 7, 255, 49151, 49152, top - 1, rng.randint(-top, top - 1)])


def _generate_request(rng: random.Random, model: str) -> router_pb2.GenerateRequest:
    request = router_pb2.GenerateRequest(
        model=rng.choice([model, "", _text(rng)]),
        request_id=_text(rng) if rng.random() < 0.6 else "",
        priority=_int(rng, 32),
    )
    which = rng.choice(["prompt", "chat", "ids", "none"])
    if which == "prompt":
        request.prompt = _text(rng)
    elif which == "chat":
        for _ in range(rng.choice([0, 1, 2, 50])):
            role = rng.choice(["user", "system", "assistant", "tool", "", _text(rng, short=True)])
            request.chat.messages.add(role=role, content=_text(rng, short=True))
        if not request.chat.messages:
            request.chat.SetInParent()
    elif which == "ids":
        request.prompt_token_ids.ids.extend(_int(rng, 32) for _ in range(rng.choice([0, 1, 5, 300, 5000])))
    sp = request.sampling
    if rng.random() < 0.8:
        sp.max_tokens = rng.choice([0, 1, 3, _int(rng, 32)])
    for name in ("temperature", "top_p"):
        if rng.random() < 0.4:
            setattr(sp, name, _float(rng))
    if rng.random() < 0.3:
        sp.top_k = _int(rng, 32)
    if rng.random() < 0.3:
        sp.seed = _int(rng, 64)
    if rng.random() < 0.3:
        sp.stop.extend(_text(rng, short=True) for _ in range(rng.choice([1, 4, 5, 3000])))
    sp.ignore_eos = rng.random() < 0.5
    return request


def _case(rng: random.Random, model: str) -> tuple[str, str, bytes]:
    roll = rng.random()
    if roll < 0.35:
        return "random bytes", rng.choice([GENERATE, ABORT]), rng.randbytes(rng.randint(0, 400))
    if roll < 0.45:  # a valid message with bytes flipped or cut: invalid UTF-8 in strings, bad lengths
        data = bytearray(_generate_request(rng, model).SerializeToString())
        for _ in range(rng.randint(1, 4)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        return (
            "corrupted message",
            GENERATE,
            bytes(data[: rng.randint(0, len(data))] if rng.random() < 0.3 else data),
        )
    if roll < 0.85:
        return "hostile fields", GENERATE, _generate_request(rng, model).SerializeToString()
    if roll < 0.9:
        request = router_pb2.GenerateRequest(
            model=model,
            prompt=rng.choice(["Hi", "Once upon a time"]),
            request_id=f"fuzz-{rng.randrange(10**9)}",
        )
        request.sampling.max_tokens = rng.randint(1, 8)
        return "valid", GENERATE, request.SerializeToString()
    request_id = _text(rng) if rng.random() < 0.9 else str(json_value(rng))
    return "abort", ABORT, router_pb2.AbortRequest(request_id=request_id).SerializeToString()


async def _call(channel: grpc.aio.Channel, path: str, body: bytes, metadata: Any) -> grpc.StatusCode:
    try:
        if path == GENERATE:
            async for _ in channel.unary_stream(path)(body, metadata=metadata, timeout=30):
                pass
        else:
            await channel.unary_unary(path)(body, metadata=metadata, timeout=30)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


async def test_five_thousand_hostile_calls_never_fail_the_server(textgen: TextGenerator) -> None:
    rng = random.Random(11)
    server, port = await start_grpc_server(textgen, "127.0.0.1", 0, credentials=CREDENTIALS)
    statuses: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    options = [("grpc.max_send_message_length", 2 * MAX_MESSAGE)]  # let the client send what it likes
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            for number in range(CASES):
                kind, path, body = _case(rng, textgen.model_name)
                key = API_KEY if rng.random() < 0.95 else rng.choice(["", "sk-wrong"])
                metadata = (("authorization", f"Bearer {key}"),) if key else ()
                code = await _call(channel, path, body, metadata)
                statuses[code.name] += 1
                if code in SERVER_FAILED:
                    failures.append(f"case {number} ({kind}) {path} {body[:100]!r} -> {code.name}")
            request = router_pb2.GenerateRequest(
                prompt="Hi", sampling=router_pb2.SamplingParams(max_tokens=3)
            )
            after = await _call(
                channel, GENERATE, request.SerializeToString(), (("authorization", f"Bearer {API_KEY}"),)
            )
    finally:
        await server.stop(None)
    assert not failures, f"{len(failures)} of {CASES}:\n" + "\n".join(failures[:20])
    assert after is grpc.StatusCode.OK
    assert {"OK", "INVALID_ARGUMENT", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED"} <= set(statuses), statuses
    print(f"\n{CASES} gRPC cases: {dict(statuses)}")
