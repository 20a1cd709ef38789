"""Fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from frontdoor.http_api import build_http_app
from frontdoor.textgen import TextGenerator
from frontdoor.tokenizer import ModelTokenizer
from kv_transfer.exchange.endpoint import KVEndpoint
from kv_transfer.transport.fake import FakeFabric, InProcessTransport
from tests.integration.api_harness import CONTEXT, DEFAULT_MAX_TOKENS, REPLY, ScriptedRouter, Stack


class Clock:
    """A clock the test moves by hand (``now``)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_stack(model_tokenizer: ModelTokenizer, model_name: str) -> Callable[..., Stack]:
    def make(reply: str = REPLY, **router_options: Any) -> Stack:
        router = ScriptedRouter(model_tokenizer.encode(reply), **router_options)
        textgen = TextGenerator(router, model_tokenizer, model_name, CONTEXT, DEFAULT_MAX_TOKENS)
        health: dict[str, Any] = {"ok": True, "prefill_workers": 1, "decode_workers": 1}
        metrics = (b"pdflow_up 1\n", "text/plain; version=0.0.4; charset=utf-8")
        app = build_http_app(
            textgen, model_name=model_name, health=lambda: health, metrics_text=lambda: metrics
        )
        return Stack(router, textgen, app, health)

    return make


@pytest.fixture
def pair():
    """A sending and a receiving KV endpoint on one in-process fabric and one hand-moved clock."""
    fabric = FakeFabric()
    clock = Clock()
    sender = KVEndpoint(InProcessTransport("p", 1 << 20, fabric), clock=clock, lease_s=10)
    receiver = KVEndpoint(InProcessTransport("d", 1 << 20, fabric), clock=clock, lease_s=10)
    yield sender, receiver, fabric, clock
    sender.close()
    receiver.close()
