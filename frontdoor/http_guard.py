"""Who and what the front door's HTTP server takes before the app sees a request: the API key, a JSON body,
a local Host and no other site's page on loopback (``Guard``, a plain ASGI middleware), and an OpenAI error
body even for a request its HTTP parser refuses (``http_protocol``)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from frontdoor.openai_schema import error_body
from protocol.auth import Credentials, is_loopback


class Guard:
    """Every path but ``/health`` needs an accepted ``Authorization: Bearer`` key when keys are configured
    (401 with ``WWW-Authenticate``). And a web page the user visits can send requests to a server on their
    machine without asking (text/plain or form posts, a fetch with no content type, a beacon), and DNS
    rebinding can give it a name of its own. So a POST must carry JSON (415), and on loopback
    (``allowed_hosts``) only local Host names are served (421) and requests a browser marks as coming from
    another site are refused (403). A plain ASGI middleware: the streams pass through untouched."""

    def __init__(self, app: Any, allowed_hosts: frozenset[str] | None, credentials: Credentials) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.credentials = credentials

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (refusal := self._refusal(scope)) is not None:
            status, code, message = refusal
            headers = {"WWW-Authenticate": 'Bearer realm="pdflow"'} if status == 401 else None
            body = error_body(message, "invalid_request_error", None, code)
            await JSONResponse(body, status, headers=headers)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        path = scope.get("path", "")
        allows = self.credentials.allows_metrics if path == "/metrics" else self.credentials.allows_api
        if path != "/health" and not allows(headers.get("authorization")):
            given = (
                "An API key that this server does not accept was"
                if headers.get("authorization")
                else ("No API key was")
            )
            return (
                401,
                "invalid_api_key",
                f"{given} provided. Send it in the header 'Authorization: Bearer <key>' (the OpenAI "
                "client's api_key).",
            )
        kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if (
            scope.get("method") == "POST"
            and kind
            and kind != "application/json"
            and not kind.endswith("+json")
        ):
            return (
                415,
                "unsupported_media_type",
                (
                    "The request body must be JSON (send the header content-type: application/json), "
                    f"not {kind}."
                ),
            )
        if self.allowed_hosts is None:
            return None
        host = _hostname(headers.get("host", ""))
        if host and host not in self.allowed_hosts:  # HTTP/1.0 tools send none; browsers always do
            names = ", ".join(sorted(self.allowed_hosts))
            return 421, "misdirected", f"This server answers to {names}, not {host!r}."
        origin = headers.get("origin", "")
        if (origin and _hostname(origin.split("://", 1)[-1]) not in self.allowed_hosts) or (
            headers.get("sec-fetch-site") == "cross-site"
        ):
            return 403, "cross_site", "Requests from another site's web page are refused by a local server."
        return None


def _hostname(authority: str) -> str:
    """The host of ``host[:port]`` or ``[v6]:port``, lower case, without a trailing dot."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1 : authority.find("]")] if "]" in authority else authority
    return authority.split("/", 1)[0].rsplit(":", 1)[0].rstrip(".")


def local_names(bind_host: str) -> frozenset[str] | None:
    """The Host names a server bound to ``bind_host`` answers to: on loopback the local ones only (no other
    name can reach it but a rebound one); elsewhere any (None)."""
    loopback = is_loopback(bind_host)
    return frozenset({"localhost", "127.0.0.1", "::1", bind_host.lower()}) if loopback else None


def http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (the one ``http="auto"`` picks) answering a request it cannot parse (a bad
    request line, a malformed header, an invalid ``Content-Length``) with an OpenAI error body, as the app
    answers everything else, instead of uvicorn's plain-text 400."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class OpenAIErrorsProtocol(AutoHTTPProtocol):  # type: ignore[misc,valid-type]
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(
                error_body(f"The HTTP request is malformed: {msg}", "invalid_request_error", None, "bad_http")
            ).encode()
            head = (
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
            self.transport.close()

    return OpenAIErrorsProtocol
