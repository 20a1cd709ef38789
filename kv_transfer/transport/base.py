"""The transport contract: a registered staging buffer per worker and one-sided byte moves between them.

A transport moves bytes, nothing else: no codec, no request ids. Offsets are into the two sides' registered
buffers; the receiver's offsets come from the handshake (its arena region), never from the sender's guess.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import torch


class XferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class TransportError(Exception):
    """A move could not be posted or failed on the wire (peer gone, connection reset)."""


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What a peer needs to move bytes into or out of this side's buffer: exchanged at handshake."""

    name: str
    metadata: bytes
    base_addr: int
    capacity: int


class Xfer(Protocol):
    """One posted move. ``state`` never blocks; ``release`` is idempotent and must follow DONE or FAILED."""

    def state(self) -> XferState: ...

    def release(self) -> None: ...


class Transport(Protocol):
    """One side's agent and registered buffer. Thread-safe for posting and polling from one thread plus
    handshakes from another (the side channel)."""

    @property
    def buffer(self) -> torch.Tensor:
        """The registered staging buffer, ``uint8``, contiguous, on the CPU."""
        ...

    def peer_info(self) -> PeerInfo: ...

    def add_peer(self, peer: PeerInfo) -> None:
        """Make ``peer`` reachable; idempotent (a second call with the same name is a no-op)."""
        ...

    def remove_peer(self, name: str) -> None: ...

    def write(
        self, peer: str, local_offset: int, remote_offset: int, nbytes: int, notif: bytes = b""
    ) -> Xfer:
        """Post a one-sided write of ``nbytes`` from this buffer into ``peer``'s; returns at once. A
        non-empty ``notif`` reaches ``peer``'s ``notifications`` once the write is done (it may come before
        the bytes are visible there: a receiver checks what it reads)."""
        ...

    def register(self, tensor: torch.Tensor) -> None:
        """Let ``write_from`` read straight out of ``tensor`` (contiguous; it must outlive this transport).
        Idempotent; raises TransportError if the memory cannot be registered."""
        ...

    def write_from(self, peer: str, spans: list[tuple[int, int, int]], notif: bytes = b"") -> Xfer:
        """Post one write of ``(address, remote_offset, nbytes)`` spans, each read from registered memory
        at ``address`` (each within a registered tensor) into ``peer``'s buffer at ``remote_offset``; returns
        at once. ``notif`` as in ``write``."""
        ...

    def read(self, peer: str, local_offset: int, remote_offset: int, nbytes: int) -> Xfer:
        """Post a one-sided read of ``nbytes`` from ``peer``'s buffer into this one; returns at once."""
        ...

    def read_into(self, peer: str, spans: list[tuple[int, int, int]]) -> Xfer:
        """Post one read of ``(remote_address, local_offset, nbytes)`` spans, each out of memory ``peer``
        registered (``register``) into this buffer at ``local_offset``; returns at once. This side's CPU
        moves the bytes (on one host) where a ``write_from`` would have had the peer's."""
        ...

    def notifications(self) -> list[bytes]:
        """The notifications of writes into this buffer that arrived since the last call, oldest first.
        Called from one thread only."""
        ...

    def close(self) -> None: ...
