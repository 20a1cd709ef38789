"""Frozen views of the cluster: what a worker reports about itself, and what the controller pushes to the
front doors. Policies decide from these alone. (``InstanceState``, the instance lifecycle, is
``protocol.instances``.)"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from protocol.ids import InstanceId, RequestId
from protocol.instances import InstanceState
from protocol.lifecycle import RequestState
from protocol.transfers import TransferRecord


class Role(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True, slots=True)
class TransferCounters:
    """Cumulative KV transfer counters of one instance (the receiving side counts them)."""

    transfers: int = 0
    failed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    external_tokens: int = 0


@dataclass(frozen=True, slots=True)
class RunningKV:
    """A request decoding on an instance, as the migration policy sees it."""

    request_id: RequestId
    kv_blocks: int
    priority: int = 0


@dataclass(frozen=True, slots=True)
class InstanceSnapshot:
    instance_id: InstanceId
    role: Role
    state: InstanceState
    actor_name: str
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    decode_tps: float = 0.0
    prompt_tps: float = 0.0
    in_flight: int = 0  # requests admitted and not yet returned (see EngineLoad.in_flight)
    transfer: TransferCounters = field(default_factory=TransferCounters)
    reported_at: float = 0.0  # seconds on the reporter's clock
    kv_endpoint: str = ""  # side-channel address where KV is pushed to this worker (pdflow connector)
    requests: tuple[RunningKV, ...] = ()  # decode workers: what runs there and the KV blocks each holds
    max_batch: int | None = None  # most requests its engine runs at once (engine.max_num_seqs), if known
    # when this run of the worker began (its clock): another value under the same id is a new start of
    # it (a StatefulSet's replacement pod, a restarted container), not the instance it replaces
    started_at: float = 0.0

    @property
    def load(self) -> int:
        """Requests on this instance by the freshest figure available."""
        return max(self.num_running + self.num_waiting, self.in_flight)

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


# Upper bounds of the migration pause histogram (seconds the client's stream was frozen).
PAUSE_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class MigrationTotals:
    """Cumulative migration figures of the controller, carried in the snapshot for the metrics."""

    counts: tuple[tuple[str, str, int], ...] = ()  # (trigger, outcome, migrations)
    wire_bytes: int = 0  # KV bytes moved by migrations that moved
    paused_buckets: tuple[int, ...] = ()  # cumulative counts per PAUSE_BUCKETS_S bound
    paused_count: int = 0
    paused_sum_s: float = 0.0


@dataclass(frozen=True, slots=True)
class AutoscalerTotals:
    """The autoscaler's figures, carried in the snapshot for the metrics (absent without an autoscaler)."""

    pools: tuple[tuple[str, int, int, int, int], ...] = ()  # (role, desired, ready, pending, draining)
    decisions: tuple[tuple[str, int], ...] = ()  # (reason, decisions so far)
    decode_tps: float = 0.0  # the metric it scales on
    prefill_miss_tps: float = 0.0
    paused: bool = False
    target_decode_tps: float = 0.0  # what one instance of each pool should carry (the config's targets)
    target_prefill_tps: float = 0.0
    enabled: bool = False  # autoscaler.enabled: the policy may act (otherwise only manual targets)


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    version: int
    instances: tuple[InstanceSnapshot, ...] = ()
    taken_at: float = 0.0
    migrations: MigrationTotals = field(default_factory=MigrationTotals)
    autoscaler: AutoscalerTotals | None = None

    def live(self, role: Role) -> tuple[InstanceSnapshot, ...]:
        return tuple(i for i in self.instances if i.role is role and i.state.schedulable)

    def by_id(self, instance_id: str) -> InstanceSnapshot | None:
        return next((i for i in self.instances if i.instance_id == instance_id), None)


@dataclass(frozen=True, slots=True)
class RequestEvent:
    """One state change of one request, as the front door saw it."""

    request_id: RequestId
    state: RequestState
    at: float
    prefill_instance: InstanceId | None = None
    decode_instance: InstanceId | None = None
    detail: str = ""
    transfer: TransferRecord | None = None  # the KV transfer, once it is known


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What the controller knows of a request: its latest state and its history."""

    request_id: RequestId
    state: RequestState
    prefill_instance: InstanceId | None
    decode_instance: InstanceId | None
    prompt_tokens: int
    output_tokens: int
    events: tuple[RequestEvent, ...]
    transfer: TransferRecord | None = None
