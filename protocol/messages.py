"""Messages between the front door and the workers. Frozen dataclasses: they cross Ray as pickles and are
never mutated after creation. Token ids only: text lives in the front door. A decode worker's stream is
``DecodeItem``s: token chunks, and at most one ``Handover`` (the request moved on to another worker) that
ends it."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from protocol.ids import RequestId
from protocol.kv_config import KVCodecKind
from protocol.kv_handle import KVHandle
from protocol.transfers import TransferRecord


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """What the client asked of sampling. The decode worker continues after the prefill's first token
    rather than sampling it again, so prefill and decode need not share a seed."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class PrefillRequest:
    request_id: RequestId
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec
    # False when the prefill's single token is known to end the request (max_tokens == 1): the prefill
    # worker then frees its blocks at once instead of holding them for a decode worker.
    hand_off: bool = True
    # The decode worker's KV endpoint (side-channel address) when the connector pushes KV to it.
    kv_destination: str = ""
    # A codec for this transfer only (benchmarks, quality studies); None: the worker's policy decides.
    kv_codec: KVCodecKind | None = None
    priority: int = 0  # from the API; higher is served first (the prefill engine's waiting queue)


@dataclass(frozen=True, slots=True)
class PrefillResult:
    request_id: RequestId
    first_token_id: int
    # None when decoding should go on; otherwise the request ended on the prefill worker.
    finish_reason: FinishReason | None
    # Where the decode worker loads the prompt's KV from; None when the request ended here.
    kv_handle: KVHandle | None
    prefill_seconds: float
    # What the KV transfer did, as the prefill side saw it (pdflow connector only).
    transfer: TransferRecord | None = None


@dataclass(frozen=True, slots=True)
class DecodeRequest:
    """Continue a prefilled request. The decode worker admits ``prompt_token_ids + [first_token_id]``, loads
    the prompt's KV through ``kv_handle`` instead of recomputing it (None: it recomputes), and streams
    tokens after the first."""

    request_id: RequestId
    prompt_token_ids: tuple[int, ...]
    first_token_id: int
    sampling: SamplingSpec
    kv_handle: KVHandle | None
    priority: int = 0  # from the API; higher is more important (the migration policy keeps headroom for > 0)


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """New tokens of one request, in order. The last chunk has ``finish_reason`` set."""

    request_id: RequestId
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    # On a decode worker's first chunk: the KV transfer it loaded, decode time included.
    transfer: TransferRecord | None = None


@dataclass(frozen=True, slots=True)
class MigrationTarget:
    """The decode worker a request migrates to."""

    instance_id: str
    actor_name: str
    kv_endpoint: str


@dataclass(frozen=True, slots=True)
class Handover:
    """A decode worker's last word on a request that moved: the front door continues it on ``target`` with
    ``continuation`` (prompt plus every token the client has, the KV parts that landed there)."""

    migration_id: str
    target: MigrationTarget
    continuation: DecodeRequest


DecodeItem = TokenChunk | Handover
"""What a decode worker's stream yields: chunks, then either a chunk with ``finish_reason`` or a Handover."""
