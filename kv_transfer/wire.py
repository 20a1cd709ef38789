"""The transfer wire format besides the payload: codec headers, part placement inside a layer's slot,
checksums and peer descriptions, all JSON-able for the side channel."""

from __future__ import annotations

import base64
import zlib
from typing import Any, cast

import torch

from kv_transfer.codec import KVHeader, KVKind, PartSpec
from kv_transfer.codec.base import SUPPORTED_DTYPES
from kv_transfer.transport.base import PeerInfo

PART_ALIGN = 16
_DTYPES = {str(d).removeprefix("torch."): d for d in SUPPORTED_DTYPES}


def header_to_wire(header: KVHeader) -> dict[str, Any]:
    return {
        "codec": header.codec,
        "kind": header.kind.value,
        "shape": list(header.shape),
        "dtype": str(header.dtype).removeprefix("torch."),
        "params": dict(header.params),
    }


def header_from_wire(data: dict[str, Any]) -> KVHeader:
    dtype = _DTYPES.get(str(data["dtype"]))
    if dtype is None:
        raise ValueError(f"transfer header: unsupported dtype {data['dtype']!r}")
    shape = tuple(int(n) for n in data["shape"])
    if len(shape) != 3:
        raise ValueError(f"transfer header: shape must have 3 dims, got {shape}")
    return KVHeader(
        codec=str(data["codec"]),
        kind=KVKind(data["kind"]),
        shape=(shape[0], shape[1], shape[2]),
        dtype=dtype,
        params={str(k): int(v) for k, v in data["params"].items()},
    )


def place_parts(specs: tuple[PartSpec, ...], start: int) -> tuple[list[tuple[int, PartSpec]], int]:
    """Offsets of each part laid end to end from ``start``, each aligned; returns them and the end."""
    placed = []
    cursor = start
    for spec in specs:
        cursor = -(-cursor // PART_ALIGN) * PART_ALIGN
        placed.append((cursor, spec))
        cursor += spec.nbytes
    return placed, cursor


def crc32(buf: torch.Tensor, offset: int, nbytes: int) -> int:
    return zlib.crc32(cast(Any, buf[offset : offset + nbytes].numpy())) if nbytes else 0


def peer_to_wire(peer: PeerInfo) -> dict[str, Any]:
    return {
        "name": peer.name,
        "metadata": base64.b64encode(peer.metadata).decode(),
        "base_addr": peer.base_addr,
        "capacity": peer.capacity,
    }


def peer_from_wire(data: dict[str, Any]) -> PeerInfo:
    return PeerInfo(
        str(data["name"]), base64.b64decode(data["metadata"]), int(data["base_addr"]), int(data["capacity"])
    )
