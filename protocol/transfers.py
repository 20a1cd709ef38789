"""What one KV transfer did: the record every transfer ends with, in exactly one outcome."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any


class TransferOutcome(enum.StrEnum):
    SUCCESS = "success"
    FAILED = "failed"
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class TransferRecord:
    """One KV transfer, as the sending side saw it (decode seconds filled in by the receiving side).

    ``encode_s`` sums the per-layer encodes; ``wire_s`` runs from the first byte posted to the last byte
    landed, so with layer pipelining it overlaps the prefill; ``tail_s`` is what remained after the last layer
    was computed, the part the request actually waits for."""

    transfer_id: str
    request_id: str
    outcome: TransferOutcome
    codec: str = ""
    reason: str = ""
    layers: int = 0
    tokens: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0
    encode_s: float = 0.0
    wire_s: float = 0.0
    tail_s: float = 0.0
    decode_s: float = 0.0
    error: str = ""
    retries: int = 0
    peer: str = ""
    # set when the transfer carried raw block images of this KV layout (codec none, read straight from the
    # sender's KV cache): the receiver copies them into its blocks as they are (``paged.block_format``)
    block_format: str = ""

    @property
    def ratio(self) -> float:
        return self.wire_bytes / self.raw_bytes if self.raw_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransferRecord:
        fields = dict(data)
        fields["outcome"] = TransferOutcome(fields["outcome"])
        return cls(**fields)
