"""``pdctl chat``: one streamed chat answer over the OpenAI HTTP API."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx

from protocol.auth import api_key_headers

DEADLINE_S = 120.0


def served_model(base_url: str) -> str:
    try:
        resp = httpx.get(f"{base_url}/v1/models", headers=api_key_headers(), timeout=10)
    except httpx.HTTPError as exc:
        raise RuntimeError(f"no pdflow front door answers at {base_url}: {exc}") from None
    if resp.status_code != 200:
        raise RuntimeError(_error_message(resp))
    return str(resp.json()["data"][0]["id"])


def stream_chat(
    base_url: str, prompt: str, *, max_tokens: int, temperature: float, write: Callable[[str], object]
) -> str:
    """Stream the answer through ``write``; return the whole text."""
    body = {
        "model": served_model(base_url),
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
    }
    text = []
    url = f"{base_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=api_key_headers(), timeout=DEADLINE_S) as resp:
        if resp.status_code != 200:
            resp.read()
            raise RuntimeError(_error_message(resp))
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                raise RuntimeError(event["error"].get("message", "the server failed the request"))
            piece = event["choices"][0]["delta"].get("content") or "" if event.get("choices") else ""
            if piece:
                text.append(piece)
                write(piece)
    return "".join(text)


def _error_message(resp: httpx.Response) -> str:
    try:
        return f"HTTP {resp.status_code}: {resp.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {resp.status_code}: {resp.text[:300]}"
