"""What a worker's sending and receiving transfers share: the transport with its registered staging buffer,
the arena that carves that buffer into leased regions, the one lock over both halves' bookkeeping, the
clock, and the records of transfers that ended here."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kv_transfer.transport.arena import Arena, Region
from kv_transfer.transport.base import Transport
from protocol.transfers import TransferRecord


@dataclass(eq=False)
class Staging:
    transport: Transport
    clock: Callable[[], float]
    lease_s: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    records: deque[TransferRecord] = field(default_factory=deque)  # ended transfers, until drained

    def __post_init__(self) -> None:
        self.arena = Arena(self.transport.buffer.numel())

    def lease(self, transfer_id: str, nbytes: int) -> Region:
        """Reserve (or renew) ``transfer_id``'s region for one lease from now. The caller holds ``lock``."""
        return self.arena.reserve(transfer_id, nbytes, now=self.clock(), lease_s=self.lease_s)

    def drain_records(self) -> list[TransferRecord]:
        records = []
        while self.records:
            records.append(self.records.popleft())
        return records
