"""Hypothesis throws odd and hostile bodies at both OpenAI endpoints (on the scripted router): whatever
comes, the answer is a status a client can act on, never a 500, and every error is an OpenAI error body.
(``test_http_fuzz.py`` runs 20,000 seeded cases; hypothesis adds search and shrinking.)"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from tests.fuzz.conftest import API_KEY
from tests.integration.api_harness import CHAT, COMPLETIONS

pytestmark = pytest.mark.integration
ANSWERS = {200, 400, 404, 413, 503}

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["\x00", "<|im_start|>", "<|endoftext|>", "\u202e", "\ufeff", "a" * 3000]),
)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.just("MODEL"), values),
        "prompt": st.one_of(st.text(max_size=200), st.lists(st.integers(-5, 2**40), max_size=8), values),
        "messages": st.one_of(
            st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "system", "assistant", "robot", ""]), "content": values}
                ),
                max_size=3,
            ),
            values,
        ),
        "max_tokens": values,
        "temperature": values,
        "top_p": values,
        "top_k": values,
        "seed": values,
        "stop": values,
        "stream": st.booleans(),
        "n": values,
        "priority": values,
    },
)
# raw text that json.dumps never writes: lone surrogate escapes, huge numbers, deep nesting, bad bytes
raw_tails = st.sampled_from(
    [b'"\\ud800"', b"1" * 4400, b"[" * 5000, b"\xff\xfe", b'"\\u0000"', b"1e999999", b"-0", b"NaN", b""]
)


def _client(app: Any) -> TestClient:
    return TestClient(
        app,
        base_url="http://127.0.0.1",
        raise_server_exceptions=False,
        headers={"authorization": f"Bearer {API_KEY}"},
    )


def _check(response: Any) -> None:
    assert response.status_code in ANSWERS, (response.status_code, response.text[:300])
    if response.status_code != 200:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert set(error) == {"message", "type", "param", "code"}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=fields, path=st.sampled_from([COMPLETIONS, CHAT]))
def test_any_json_body_gets_an_answer_a_client_can_act_on(
    app: Any, model_name: str, body: dict[str, Any], path: str
) -> None:
    if body.get("model") == "MODEL":
        body["model"] = model_name
    _check(_client(app).post(path, content=json.dumps(body, default=str).encode()))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.binary(max_size=30), tail=raw_tails, path=st.sampled_from([COMPLETIONS, CHAT]))
def test_any_bytes_get_an_answer_a_client_can_act_on(app: Any, prefix: bytes, tail: bytes, path: str) -> None:
    client = _client(app)
    _check(client.post(path, content=b'{"model": "m", "prompt": ' + prefix + tail + b"}"))
    _check(client.post(path, content=prefix + tail))
