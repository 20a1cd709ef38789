"""The staging arena: one registered buffer per worker, carved into leased regions, one per transfer.

Pure bookkeeping over offsets; the bytes live in the transport's registered tensor. A region is reserved
under a key (the transfer id) before any byte is written into it, and leaves either by ``release`` (the
transfer landed and was decoded, or was aborted) or by ``expire`` once its lease ran out (the peer died).
Reserving an existing key returns the same region: the handshake may be retried without leaking.
"""

from __future__ import annotations

from dataclasses import dataclass

ALIGNMENT = 64
"""Region offsets and sizes are multiples of a cache line, so parts copied into them stay aligned."""


class ArenaFull(Exception):
    """No free range is large enough; retryable once transfers in flight land."""


@dataclass(frozen=True, slots=True)
class Region:
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(slots=True)
class _Lease:
    region: Region
    expires_at: float


class Arena:
    """First-fit allocator over ``capacity`` bytes with a lease per region. Not thread-safe: its owner
    serialises calls (the transport's lock)."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"arena capacity must be > 0, got {capacity}")
        self.capacity = capacity - capacity % ALIGNMENT
        self._leases: dict[str, _Lease] = {}

    def reserve(self, key: str, nbytes: int, *, now: float, lease_s: float) -> Region:
        """A region of at least ``nbytes`` under ``key``; the same region again if ``key`` holds one (its
        lease renewed). Raises ``ArenaFull`` when no gap fits and ``ValueError`` for a size past capacity."""
        if nbytes <= 0:
            raise ValueError(f"region size must be > 0, got {nbytes}")
        held = self._leases.get(key)
        if held is not None:
            if held.region.nbytes < nbytes:
                raise ValueError(f"transfer {key} already holds {held.region.nbytes} B, asked {nbytes} B")
            held.expires_at = now + lease_s
            return held.region
        size = -(-nbytes // ALIGNMENT) * ALIGNMENT
        if size > self.capacity:
            raise ValueError(f"transfer {key} needs {size} B, more than the whole arena ({self.capacity} B)")
        cursor = 0
        for region in sorted((lease.region for lease in self._leases.values()), key=lambda r: r.offset):
            if region.offset - cursor >= size:
                break
            cursor = max(cursor, region.end)
        if self.capacity - cursor < size:
            raise ArenaFull(
                f"staging arena full: {size} B wanted, {self.free_bytes} B free, {len(self._leases)} regions"
            )
        region = Region(cursor, size)
        self._leases[key] = _Lease(region, now + lease_s)
        return region

    def release(self, key: str) -> bool:
        """Free ``key``'s region; False if it held none (already released or expired). Idempotent."""
        return self._leases.pop(key, None) is not None

    def expire(self, now: float) -> list[str]:
        """Free every region whose lease ran out; returns their keys."""
        gone = [key for key, lease in self._leases.items() if lease.expires_at <= now]
        for key in gone:
            del self._leases[key]
        return gone

    def region(self, key: str) -> Region | None:
        lease = self._leases.get(key)
        return lease.region if lease is not None else None

    @property
    def keys(self) -> list[str]:
        return list(self._leases)

    @property
    def used_bytes(self) -> int:
        return sum(lease.region.nbytes for lease in self._leases.values())

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used_bytes
