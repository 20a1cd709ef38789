"""The fuzz suites' stack: the front door's HTTP and gRPC APIs on the scripted token router (no engines),
with API keys on, as a deployment runs them."""

from __future__ import annotations

from typing import Any

import pytest

from frontdoor.http_guard import local_names
from frontdoor.textgen import TextGenerator
from protocol.auth import Credentials
from tests.integration.api_harness import api_app

API_KEY = "sk-fuzz-key"
CREDENTIALS = Credentials.from_env({"PDFLOW_API_KEYS": API_KEY})


@pytest.fixture
def app(textgen: TextGenerator) -> Any:
    return api_app(textgen, allowed_hosts=local_names("127.0.0.1"), credentials=CREDENTIALS)
