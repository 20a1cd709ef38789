"""20,000 hostile HTTP requests (``cases.py``) against the front door's HTTP API on the scripted router, with
API keys on: none gets a 5xx, every error is an OpenAI error body, every stream is well-formed server-sent
events, nothing is logged as an unexpected error, and the server still answers a plain request afterwards."""

from __future__ import annotations

import collections
import json
import logging
import random
from typing import Any

import httpx
import pytest

from tests.fuzz.cases import HttpCase, http_cases
from tests.fuzz.conftest import API_KEY

pytestmark = pytest.mark.integration
CASES = 20_000


def _authorization(rng: random.Random) -> dict[str, str]:
    """Mostly the key, so that the cases reach the parser; sometimes none or a wrong one."""
    roll = rng.random()
    if roll < 0.9:
        return {"authorization": f"Bearer {API_KEY}"}
    return (
        {}
        if roll < 0.95
        else {"authorization": rng.choice(["Bearer ", "Basic eA==", "Bearer \x00", "x" * 9000])}
    )


def _problem(case: HttpCase, response: httpx.Response) -> str | None:
    """What is wrong with the answer to ``case``, or None."""
    status = response.status_code
    if status >= 500:
        return f"{status}: {response.text[:300]}"
    if case.method == "HEAD":
        return None
    if status >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"{status} without an OpenAI error body: {response.text[:300]}"
        if set(error) != {"message", "type", "param", "code"} or not isinstance(error["message"], str):
            return f"{status} with a malformed error body: {error}"
        return None
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        text = response.text
        if not text.endswith("data: [DONE]\n\n"):
            return f"a stream that does not end with [DONE]: {text[-300:]}"
        for event in text[:-2].split("\n\n")[:-1]:
            if not event.startswith("data: "):
                return f"not an SSE data event: {event[:200]}"
            data = json.loads(event[len("data: ") :])
            if data.get("error", {}).get("type") == "internal_error":
                return f"an internal error in the stream: {data}"
    return None


async def test_twenty_thousand_hostile_requests_get_no_5xx_and_openai_errors(
    app: Any, model_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(7)
    statuses: collections.Counter[int] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a 500 is counted, not raised
    with caplog.at_level(logging.ERROR):
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=30) as client:
            for case in http_cases(CASES, model_name):
                headers = [
                    (k.encode(), v.encode()) for k, v in {**case.headers, **_authorization(rng)}.items()
                ]
                request = client.build_request(case.method, case.path, content=case.body, headers=headers)
                response = await client.send(request)
                statuses[response.status_code] += 1
                kinds[case.kind] += 1
                if (problem := _problem(case, response)) is not None:
                    problems.append(f"{case.describe()} -> {problem}")
            after = await client.post(
                "/v1/completions",
                json={"model": model_name, "prompt": "Hi", "max_tokens": 3},
                headers={"authorization": f"Bearer {API_KEY}"},
            )
    assert not problems, f"{len(problems)} of {CASES} cases:\n" + "\n".join(problems[:20])
    assert sum(statuses.values()) == CASES
    unexpected = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not unexpected, unexpected[:5]
    assert after.status_code == 200 and after.json()["choices"][0]["text"]
    # the cases reach every answer a client can get, valid ones included
    assert {200, 400, 401, 404, 405, 413, 415} <= set(statuses), statuses
    assert kinds["valid"] > 500 and len(kinds) >= 12, kinds
    print(f"\n{CASES} HTTP cases: statuses {dict(sorted(statuses.items()))}; kinds {dict(kinds)}")
