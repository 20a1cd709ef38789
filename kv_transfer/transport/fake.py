"""An in-process transport for unit tests: peers are buffers in one dict, a move is a ``copy_`` done at
post time. ``corrupt_writes`` flips one byte in the next N writes so that checksum retries can be tested."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from kv_transfer.transport.base import PeerInfo, TransportError, XferState


@dataclass
class FakeFabric:
    """The shared 'network': every in-process transport registers its buffer here."""

    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    notifs: dict[str, deque[bytes]] = field(default_factory=dict)
    corrupt_writes: int = 0
    fail_writes: int = 0
    moves: int = 0
    sources: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # registered memory, by name


class _Done:
    def __init__(self, state: XferState) -> None:
        self._state = state

    def state(self) -> XferState:
        return self._state

    def release(self) -> None:
        return None


class InProcessTransport:
    def __init__(self, name: str, capacity: int, fabric: FakeFabric) -> None:
        self._name = name
        self._fabric = fabric
        self._buffer = torch.zeros(capacity, dtype=torch.uint8)
        self._peers: set[str] = set()
        self._sources: dict[int, torch.Tensor] = {}  # address -> the registered bytes
        fabric.buffers[name] = self._buffer
        fabric.notifs[name] = deque()
        fabric.sources[name] = self._sources

    @property
    def buffer(self) -> torch.Tensor:
        return self._buffer

    def peer_info(self) -> PeerInfo:
        return PeerInfo(self._name, self._name.encode(), 0, self._buffer.numel())

    def add_peer(self, peer: PeerInfo) -> None:
        self._peers.add(peer.name)

    def remove_peer(self, name: str) -> None:
        self._peers.discard(name)

    def write(
        self, peer: str, local_offset: int, remote_offset: int, nbytes: int, notif: bytes = b""
    ) -> _Done:
        remote = self._remote(peer)
        if self._fabric.fail_writes > 0:
            self._fabric.fail_writes -= 1
            return _Done(XferState.FAILED)
        remote[remote_offset : remote_offset + nbytes].copy_(
            self._buffer[local_offset : local_offset + nbytes]
        )
        if self._fabric.corrupt_writes > 0 and nbytes > 0:
            self._fabric.corrupt_writes -= 1
            remote[remote_offset] ^= 0xFF
        self._fabric.moves += 1
        if notif:
            self._fabric.notifs[peer].append(notif)
        return _Done(XferState.DONE)

    def register(self, tensor: torch.Tensor) -> None:
        if not tensor.is_contiguous():
            raise TransportError("only contiguous memory can be registered")
        self._sources[tensor.data_ptr()] = tensor.view(-1).view(torch.uint8)

    def write_from(self, peer: str, spans: list[tuple[int, int, int]], notif: bytes = b"") -> _Done:
        remote = self._remote(peer)
        for address, remote_offset, nbytes in spans:
            remote[remote_offset : remote_offset + nbytes].copy_(self._source(address, nbytes))
        self._fabric.moves += 1
        if notif:
            self._fabric.notifs[peer].append(notif)
        return _Done(XferState.DONE)

    def read(self, peer: str, local_offset: int, remote_offset: int, nbytes: int) -> _Done:
        remote = self._remote(peer)
        self._buffer[local_offset : local_offset + nbytes].copy_(
            remote[remote_offset : remote_offset + nbytes]
        )
        self._fabric.moves += 1
        return _Done(XferState.DONE)

    def read_into(self, peer: str, spans: list[tuple[int, int, int]]) -> _Done:
        self._remote(peer)
        registered = self._fabric.sources.get(peer, {})
        for address, local_offset, nbytes in spans:
            if local_offset < 0 or local_offset + nbytes > self._buffer.numel():
                raise TransportError(f"read of {nbytes} B into offset {local_offset} leaves this buffer")
            self._buffer[local_offset : local_offset + nbytes].copy_(_within(registered, address, nbytes))
        self._fabric.moves += 1
        return _Done(XferState.DONE)

    def notifications(self) -> list[bytes]:
        queue, out = self._fabric.notifs.get(self._name, deque()), []
        while queue:
            out.append(queue.popleft())
        return out

    def close(self) -> None:
        self._fabric.buffers.pop(self._name, None)
        self._fabric.sources.pop(self._name, None)

    def _source(self, address: int, nbytes: int) -> torch.Tensor:
        return _within(self._sources, address, nbytes)

    def _remote(self, peer: str) -> torch.Tensor:
        if peer not in self._peers:
            raise TransportError(f"{self._name}: unknown peer {peer!r} (no handshake)")
        remote = self._fabric.buffers.get(peer)
        if remote is None:
            raise TransportError(f"{self._name}: peer {peer!r} is gone")
        return remote


def _within(registered: dict[int, torch.Tensor], address: int, nbytes: int) -> torch.Tensor:
    for start, data in registered.items():
        if start <= address and address + nbytes <= start + data.numel():
            return data[address - start : address - start + nbytes]
    raise TransportError(f"{nbytes} B at {address:#x}: not registered memory")
