"""What the scheduler half of ``PdflowConnector`` hands its worker half each step (the requests to save and
to load, the transfers to drop), and the transfer records the worker half reports through vLLM's connector
stats. Imported only inside vLLM's processes."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from protocol.kv_config import KVCodecKind
from protocol.kv_handle import KVPart


@dataclass(frozen=True, slots=True)
class SaveSpec:
    transfer_id: str
    destination: str
    block_ids: list[int]
    tokens: int
    codec: KVCodecKind | None


@dataclass(frozen=True, slots=True)
class LoadSpec:
    parts: tuple[KVPart, ...]  # in token order
    block_ids: list[int]
    tokens: int
    local_tokens: int  # a local prefix-cache hit (whole blocks): those blocks are shared, never written
    block_format: str = ""  # set: the parts are raw block images of this layout (see paged.block_format)
    # parts that landed before the request was handed over (a migration's, but its last in flight): one that
    # is not here when the load starts is lost, and the load fails at once instead of waiting
    landed_before: frozenset[str] = frozenset()
    # every part landed before the request came: vLLM schedules the request in the step that loads it, and
    # is not told when the load is done
    sync: bool = False
    keep: bool = False  # leave the parts landed once loaded (``LoadParams.keep``)


@dataclass
class PdflowConnectorMetadata(KVConnectorMetadata):
    saves: dict[str, SaveSpec] = field(default_factory=dict)
    loads: dict[str, LoadSpec] = field(default_factory=dict)
    drops: list[str] = field(default_factory=list)  # transfer ids of requests that ended before loading


@dataclass
class PdflowTransferStats(KVConnectorStats):
    """Finished transfer records since the last step, plus the totals vLLM's NIXL stats also carry."""

    def __post_init__(self) -> None:
        self.data.setdefault("pdflow_records", [])

    def reset(self) -> None:
        self.data = {"pdflow_records": []}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        self.data["pdflow_records"] = [*self.data["pdflow_records"], *other.data.get("pdflow_records", [])]
        return self

    def reduce(self) -> dict[str, int | float]:
        records = self.data["pdflow_records"]
        return {"transfers": len(records), "wire_bytes": sum(int(r["wire_bytes"]) for r in records)}

    def is_empty(self) -> bool:
        return not self.data["pdflow_records"]
