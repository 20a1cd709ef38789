"""The fuzz suites' stack: the front door's HTTP and gRPC APIs on the scripted token router (no engines),
with API keys on, as a deployment runs them."""

from __future__ import annotations

from typing import Any

import pytest

from frontdoor.http_api import build_http_app, local_names
from frontdoor.textgen import TextGenerator
from protocol.auth import Credentials

API_KEY = "sk-fuzz-key"
CREDENTIALS = Credentials.from_env({"PDFLOW_API_KEYS": API_KEY})


@pytest.fixture
def app(textgen: TextGenerator) -> Any:
    return build_http_app(
        textgen,
        model_name=textgen.model_name,
        health=lambda: {"ok": True},
        metrics_text=lambda: (b"pdflow_up 1\n", "text/plain"),
        allowed_hosts=local_names("127.0.0.1"),
        credentials=CREDENTIALS,
    )
