"""The side channel: small JSON request/reply messages between two workers' transfer endpoints (the typed
operations of ``protocol.kv_ops``: reservation, commit, abort, pulls, pushes), over ZeroMQ TCP. Bulk bytes
never travel here; they go through the transport.

Every call has a deadline; a server handler's exception comes back to the caller as ``SideChannelError`` with
the handler's message.

With the cluster secret (``protocol.auth``), each message and each reply travels as two frames, the JSON and
its HMAC-SHA256 under the secret: a server refuses a request that is not signed with it (so only the
cluster's own processes can reserve, pull or push KV), and a client refuses a reply that is not.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import zmq

from protocol.auth import Credentials
from protocol.kv_ops import Op, op_to_wire, parse_reply

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 16 << 20  # side-channel messages are small JSON (a manifest is a few KB)

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class SideChannelError(Exception):
    """The peer is unreachable, missed the deadline, or refused the request (its message says why)."""


class SideChannelTimeout(SideChannelError):
    """The peer did not answer within the deadline: stopped, hung, or starved."""


def _tag(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()


def _signed(secret: bytes | None, body: bytes) -> list[bytes]:
    return [body] if secret is None else [body, _tag(secret, body)]


def _verified(secret: bytes | None, frames: list[bytes]) -> bytes | None:
    """The body of ``[body]`` or ``[body, tag]``; None if the secret is set and the tag is missing or
    wrong."""
    if secret is None:
        return frames[0]
    if len(frames) != 2 or not hmac.compare_digest(frames[1], _tag(secret, frames[0])):
        return None
    return frames[0]


class SideChannelServer:
    """Serves ``handler`` on ``tcp://host:port`` (port 0: a free one) from a daemon thread; with ``secret``,
    only requests signed with it (without, it binds loopback only: ``CredentialError``)."""

    def __init__(
        self, handler: Handler, host: str = "127.0.0.1", port: int = 0, secret: bytes | None = None
    ) -> None:
        Credentials(cluster_secret=secret).require_cluster_secret_for(host)  # unsigned: loopback only
        self._handler = handler
        self._secret = secret
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # a peer's huge frame: dropped, no OOM
        if port:
            self._sock.bind(f"tcp://{host}:{port}")
        else:
            port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"{host}:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"kv-side-channel-{port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            frames = self._sock.recv_multipart()
            if len(frames) not in (3, 4) or frames[1]:  # not a REQ client (ident, empty, body[, tag])
                log.warning("side channel: dropped a message of %d frames (3 or 4 expected)", len(frames))
                continue
            ident, body = frames[0], _verified(self._secret, frames[2:])
            try:
                if body is None:
                    raise PermissionError(
                        "the request is not signed with this cluster's secret (every worker needs the same "
                        "PDFLOW_CLUSTER_SECRET)"
                    )
                reply = {"ok": True, **self._handler(json.loads(body))}
            except Exception as exc:  # a bad request is answered, never the end of this thread
                log.debug("side-channel request failed: %s", exc)
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            try:
                answer = json.dumps(reply, default=str).encode()
                self._sock.send_multipart([ident, b"", *_signed(self._secret, answer)])
            except zmq.ZMQError as exc:  # the asker is gone
                log.warning("side channel: reply not sent: %s", exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(linger=0)


class SideChannelClient:
    """Request/reply to one peer, signed with ``secret`` when given. One socket per peer; a timed-out socket
    is rebuilt so that a late reply never answers the next request. Not thread-safe: one caller thread."""

    def __init__(self, address: str, secret: bytes | None = None) -> None:
        self.address = address
        self._secret = secret
        self._sock: zmq.Socket[bytes] | None = None

    def ask(self, op: Op, *, timeout_s: float) -> Any:
        """Send ``op`` and return its typed reply (``protocol.kv_ops``); ``SideChannelError`` as ``call``,
        and for a reply that is not the one ``op`` expects."""
        reply = self.call(op_to_wire(op), timeout_s=timeout_s)
        try:
            return parse_reply(op, reply)
        except ValueError as exc:
            raise SideChannelError(f"{op.OP} to {self.address}: malformed reply: {exc}") from exc

    def call(self, message: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
        sock = self._socket()
        sock.send_multipart(_signed(self._secret, json.dumps(message).encode()))
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            self.close()
            raise SideChannelTimeout(
                f"{message.get('op')} to {self.address}: no reply within {timeout_s:g} s"
            )
        body = _verified(self._secret, sock.recv_multipart())
        if body is None:
            raise SideChannelError(
                f"{message.get('op')} to {self.address}: the reply is not signed with this cluster's secret "
                "(every worker needs the same PDFLOW_CLUSTER_SECRET)"
            )
        reply = json.loads(body)
        if not reply.get("ok"):
            raise SideChannelError(f"{message.get('op')} refused by {self.address}: {reply.get('error')}")
        return dict(reply)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{self.address}")
            self._sock = sock
        return self._sock
