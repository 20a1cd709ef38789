from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TransferCounters(_message.Message):
    __slots__ = ("transfers", "failed", "bytes", "seconds", "external_tokens")
    TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    transfers: int
    failed: int
    bytes: int
    seconds: float
    external_tokens: int
    def __init__(self, transfers: _Optional[int] = ..., failed: _Optional[int] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., external_tokens: _Optional[int] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("instance_id", "role", "state", "num_running", "num_waiting", "kv_blocks_used", "kv_blocks_total", "decode_tps", "prompt_tps", "transfer", "seconds_since_report")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DECODE_TPS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TPS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_REPORT_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    role: str
    state: str
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    decode_tps: float
    prompt_tps: float
    transfer: TransferCounters
    seconds_since_report: float
    def __init__(self, instance_id: _Optional[str] = ..., role: _Optional[str] = ..., state: _Optional[str] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., decode_tps: _Optional[float] = ..., prompt_tps: _Optional[float] = ..., transfer: _Optional[_Union[TransferCounters, _Mapping]] = ..., seconds_since_report: _Optional[float] = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("model", "instances", "requests_by_state", "http_address", "grpc_address", "snapshot_version", "migrations_in_flight")
    class RequestsByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    HTTP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    model: str
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    requests_by_state: _containers.ScalarMap[str, int]
    http_address: str
    grpc_address: str
    snapshot_version: int
    migrations_in_flight: _containers.RepeatedCompositeFieldContainer[MigrationInfo]
    def __init__(self, model: _Optional[str] = ..., instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., requests_by_state: _Optional[_Mapping[str, int]] = ..., http_address: _Optional[str] = ..., grpc_address: _Optional[str] = ..., snapshot_version: _Optional[int] = ..., migrations_in_flight: _Optional[_Iterable[_Union[MigrationInfo, _Mapping]]] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ("role",)
    ROLE_FIELD_NUMBER: _ClassVar[int]
    role: str
    def __init__(self, role: _Optional[str] = ...) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    def __init__(self, instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ...) -> None: ...

class RequestEvent(_message.Message):
    __slots__ = ("state", "at", "detail")
    STATE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    state: str
    at: float
    detail: str
    def __init__(self, state: _Optional[str] = ..., at: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class TransferInfo(_message.Message):
    __slots__ = ("transfer_id", "codec", "reason", "raw_bytes", "wire_bytes", "encode_seconds", "wire_seconds", "tail_seconds", "decode_seconds", "outcome", "error", "retries", "layers", "tokens")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WIRE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TAIL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    codec: str
    reason: str
    raw_bytes: int
    wire_bytes: int
    encode_seconds: float
    wire_seconds: float
    tail_seconds: float
    decode_seconds: float
    outcome: str
    error: str
    retries: int
    layers: int
    tokens: int
    def __init__(self, transfer_id: _Optional[str] = ..., codec: _Optional[str] = ..., reason: _Optional[str] = ..., raw_bytes: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., encode_seconds: _Optional[float] = ..., wire_seconds: _Optional[float] = ..., tail_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ..., outcome: _Optional[str] = ..., error: _Optional[str] = ..., retries: _Optional[int] = ..., layers: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class RequestInfo(_message.Message):
    __slots__ = ("request_id", "state", "prefill_instance", "decode_instance", "prompt_tokens", "output_tokens", "events", "transfer")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    DECODE_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    state: str
    prefill_instance: str
    decode_instance: str
    prompt_tokens: int
    output_tokens: int
    events: _containers.RepeatedCompositeFieldContainer[RequestEvent]
    transfer: TransferInfo
    def __init__(self, request_id: _Optional[str] = ..., state: _Optional[str] = ..., prefill_instance: _Optional[str] = ..., decode_instance: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., events: _Optional[_Iterable[_Union[RequestEvent, _Mapping]]] = ..., transfer: _Optional[_Union[TransferInfo, _Mapping]] = ...) -> None: ...

class ListRequestsRequest(_message.Message):
    __slots__ = ("state", "limit", "request_id")
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    state: str
    limit: int
    request_id: str
    def __init__(self, state: _Optional[str] = ..., limit: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ListRequestsResponse(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RequestInfo]
    def __init__(self, requests: _Optional[_Iterable[_Union[RequestInfo, _Mapping]]] = ...) -> None: ...

class MigrationInfo(_message.Message):
    __slots__ = ("request_id", "migration_id", "source", "destination", "mode", "trigger", "outcome", "error", "stages", "blocks", "wire_bytes", "tokens", "paused_seconds", "duration_seconds", "started_at", "primed_blocks")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PAUSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    PRIMED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    migration_id: str
    source: str
    destination: str
    mode: str
    trigger: str
    outcome: str
    error: str
    stages: int
    blocks: int
    wire_bytes: int
    tokens: int
    paused_seconds: float
    duration_seconds: float
    started_at: float
    primed_blocks: int
    def __init__(self, request_id: _Optional[str] = ..., migration_id: _Optional[str] = ..., source: _Optional[str] = ..., destination: _Optional[str] = ..., mode: _Optional[str] = ..., trigger: _Optional[str] = ..., outcome: _Optional[str] = ..., error: _Optional[str] = ..., stages: _Optional[int] = ..., blocks: _Optional[int] = ..., wire_bytes: _Optional[int] = ..., tokens: _Optional[int] = ..., paused_seconds: _Optional[float] = ..., duration_seconds: _Optional[float] = ..., started_at: _Optional[float] = ..., primed_blocks: _Optional[int] = ...) -> None: ...

class MigrateRequest(_message.Message):
    __slots__ = ("request_id", "to_instance", "mode")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TO_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    to_instance: str
    mode: str
    def __init__(self, request_id: _Optional[str] = ..., to_instance: _Optional[str] = ..., mode: _Optional[str] = ...) -> None: ...

class InstanceRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("instance_id", "timeout_seconds")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    timeout_seconds: float
    def __init__(self, instance_id: _Optional[str] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("moved", "failed", "finished", "remaining", "migrations", "seconds")
    MOVED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    moved: int
    failed: int
    finished: int
    remaining: int
    migrations: _containers.RepeatedCompositeFieldContainer[MigrationInfo]
    seconds: float
    def __init__(self, moved: _Optional[int] = ..., failed: _Optional[int] = ..., finished: _Optional[int] = ..., remaining: _Optional[int] = ..., migrations: _Optional[_Iterable[_Union[MigrationInfo, _Mapping]]] = ..., seconds: _Optional[float] = ...) -> None: ...

class ListMigrationsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListMigrationsResponse(_message.Message):
    __slots__ = ("in_flight", "recent")
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    in_flight: _containers.RepeatedCompositeFieldContainer[MigrationInfo]
    recent: _containers.RepeatedCompositeFieldContainer[MigrationInfo]
    def __init__(self, in_flight: _Optional[_Iterable[_Union[MigrationInfo, _Mapping]]] = ..., recent: _Optional[_Iterable[_Union[MigrationInfo, _Mapping]]] = ...) -> None: ...

class AutoscalerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PoolScale(_message.Message):
    __slots__ = ("role", "desired", "ready", "pending", "draining")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DESIRED_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    role: str
    desired: int
    ready: int
    pending: int
    draining: int
    def __init__(self, role: _Optional[str] = ..., desired: _Optional[int] = ..., ready: _Optional[int] = ..., pending: _Optional[int] = ..., draining: _Optional[int] = ...) -> None: ...

class ScaleDecisionInfo(_message.Message):
    __slots__ = ("decision_id", "at", "reason", "detail", "prefill", "decode", "victims", "restore", "flips", "cancel", "remove", "actions", "manual", "decode_tps", "prefill_miss_tps", "ttft_p99_seconds", "tpot_p99_seconds", "instances")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    VICTIMS_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FIELD_NUMBER: _ClassVar[int]
    FLIPS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    MANUAL_FIELD_NUMBER: _ClassVar[int]
    DECODE_TPS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MISS_TPS_FIELD_NUMBER: _ClassVar[int]
    TTFT_P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TPOT_P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    decision_id: int
    at: float
    reason: str
    detail: str
    prefill: int
    decode: int
    victims: _containers.RepeatedScalarFieldContainer[str]
    restore: _containers.RepeatedScalarFieldContainer[str]
    flips: _containers.RepeatedScalarFieldContainer[str]
    cancel: _containers.RepeatedScalarFieldContainer[str]
    remove: _containers.RepeatedScalarFieldContainer[str]
    actions: _containers.RepeatedScalarFieldContainer[str]
    manual: bool
    decode_tps: float
    prefill_miss_tps: float
    ttft_p99_seconds: float
    tpot_p99_seconds: float
    instances: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, decision_id: _Optional[int] = ..., at: _Optional[float] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., prefill: _Optional[int] = ..., decode: _Optional[int] = ..., victims: _Optional[_Iterable[str]] = ..., restore: _Optional[_Iterable[str]] = ..., flips: _Optional[_Iterable[str]] = ..., cancel: _Optional[_Iterable[str]] = ..., remove: _Optional[_Iterable[str]] = ..., actions: _Optional[_Iterable[str]] = ..., manual: _Optional[bool] = ..., decode_tps: _Optional[float] = ..., prefill_miss_tps: _Optional[float] = ..., ttft_p99_seconds: _Optional[float] = ..., tpot_p99_seconds: _Optional[float] = ..., instances: _Optional[_Iterable[str]] = ...) -> None: ...

class AutoscalerStatus(_message.Message):
    __slots__ = ("enabled", "actuator", "paused", "pools", "decode_tps", "prefill_miss_tps", "decisions_by_reason", "last")
    class DecisionsByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    ACTUATOR_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TPS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MISS_TPS_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    actuator: str
    paused: str
    pools: _containers.RepeatedCompositeFieldContainer[PoolScale]
    decode_tps: float
    prefill_miss_tps: float
    decisions_by_reason: _containers.ScalarMap[str, int]
    last: ScaleDecisionInfo
    def __init__(self, enabled: _Optional[bool] = ..., actuator: _Optional[str] = ..., paused: _Optional[str] = ..., pools: _Optional[_Iterable[_Union[PoolScale, _Mapping]]] = ..., decode_tps: _Optional[float] = ..., prefill_miss_tps: _Optional[float] = ..., decisions_by_reason: _Optional[_Mapping[str, int]] = ..., last: _Optional[_Union[ScaleDecisionInfo, _Mapping]] = ...) -> None: ...

class ExplainAutoscalerRequest(_message.Message):
    __slots__ = ("limit", "acting_only")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    ACTING_ONLY_FIELD_NUMBER: _ClassVar[int]
    limit: int
    acting_only: bool
    def __init__(self, limit: _Optional[int] = ..., acting_only: _Optional[bool] = ...) -> None: ...

class ExplainAutoscalerResponse(_message.Message):
    __slots__ = ("decisions",)
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[ScaleDecisionInfo]
    def __init__(self, decisions: _Optional[_Iterable[_Union[ScaleDecisionInfo, _Mapping]]] = ...) -> None: ...

class PauseAutoscalerRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ResumeAutoscalerRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ScaleRequest(_message.Message):
    __slots__ = ("prefill", "decode")
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    prefill: int
    decode: int
    def __init__(self, prefill: _Optional[int] = ..., decode: _Optional[int] = ...) -> None: ...

class SetRoleRequest(_message.Message):
    __slots__ = ("instance_id", "role")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    role: str
    def __init__(self, instance_id: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...
