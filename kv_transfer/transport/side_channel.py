"""The side channel: small JSON request/reply messages between two workers' transfer endpoints (the typed
operations of ``protocol.kv_ops``: reservation, commit, abort, pulls, pushes), over ZeroMQ TCP. Bulk bytes
never travel here; they go through the transport.

Every call has a deadline; a server handler's exception comes back to the caller as ``SideChannelError`` with
the handler's message.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import zmq

from protocol.kv_ops import Op, op_to_wire, parse_reply

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 16 << 20  # side-channel messages are small JSON (a manifest is a few KB)

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class SideChannelError(Exception):
    """The peer is unreachable, missed the deadline, or refused the request (its message says why)."""


class SideChannelServer:
    """Serves ``handler`` on ``tcp://host:port`` (port 0: a free one) from a daemon thread."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self._handler = handler
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
            if len(frames) != 3:  # not a client of ours (ident, empty, body): nothing to answer to
                log.warning("side channel: dropped a message of %d frames (3 expected)", len(frames))
                continue
            ident, _, body = frames
            try:
                reply = {"ok": True, **self._handler(json.loads(body))}
            except Exception as exc:  # a bad request is answered, never the end of this thread
                log.debug("side-channel request failed: %s", exc)
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            try:
                self._sock.send_multipart([ident, b"", json.dumps(reply, default=str).encode()])
            except zmq.ZMQError as exc:  # the asker is gone
                log.warning("side channel: reply not sent: %s", exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(linger=0)


class SideChannelClient:
    """Request/reply to one peer. One socket per peer; a timed-out socket is rebuilt so that a late reply
    never answers the next request. Not thread-safe: one caller thread."""

    def __init__(self, address: str) -> None:
        self.address = address
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
        sock.send(json.dumps(message).encode())
        if not sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            self.close()
            raise SideChannelError(f"{message.get('op')} to {self.address}: no reply within {timeout_s:g} s")
        reply = json.loads(sock.recv())
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
