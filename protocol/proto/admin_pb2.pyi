from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

DESCRIPTOR: _descriptor.FileDescriptor

class TransferCounters(_message.Message):
    __slots__ = ("bytes", "external_tokens", "failed", "seconds", "transfers")
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
    def __init__(self, transfers: int | None = ..., failed: int | None = ..., bytes: int | None = ..., seconds: float | None = ..., external_tokens: int | None = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("decode_tps", "instance_id", "kv_blocks_total", "kv_blocks_used", "num_running", "num_waiting", "prompt_tps", "role", "seconds_since_report", "state", "transfer")
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
    def __init__(self, instance_id: str | None = ..., role: str | None = ..., state: str | None = ..., num_running: int | None = ..., num_waiting: int | None = ..., kv_blocks_used: int | None = ..., kv_blocks_total: int | None = ..., decode_tps: float | None = ..., prompt_tps: float | None = ..., transfer: TransferCounters | _Mapping | None = ..., seconds_since_report: float | None = ...) -> None: ...

class ClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("grpc_address", "http_address", "instances", "model", "requests_by_state", "snapshot_version")
    class RequestsByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: str | None = ..., value: int | None = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    HTTP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    requests_by_state: _containers.ScalarMap[str, int]
    http_address: str
    grpc_address: str
    snapshot_version: int
    def __init__(self, model: str | None = ..., instances: _Iterable[Instance | _Mapping] | None = ..., requests_by_state: _Mapping[str, int] | None = ..., http_address: str | None = ..., grpc_address: str | None = ..., snapshot_version: int | None = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ("role",)
    ROLE_FIELD_NUMBER: _ClassVar[int]
    role: str
    def __init__(self, role: str | None = ...) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    def __init__(self, instances: _Iterable[Instance | _Mapping] | None = ...) -> None: ...

class RequestEvent(_message.Message):
    __slots__ = ("at", "detail", "state")
    STATE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    state: str
    at: float
    detail: str
    def __init__(self, state: str | None = ..., at: float | None = ..., detail: str | None = ...) -> None: ...

class RequestInfo(_message.Message):
    __slots__ = ("decode_instance", "events", "output_tokens", "prefill_instance", "prompt_tokens", "request_id", "state")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    DECODE_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    state: str
    prefill_instance: str
    decode_instance: str
    prompt_tokens: int
    output_tokens: int
    events: _containers.RepeatedCompositeFieldContainer[RequestEvent]
    def __init__(self, request_id: str | None = ..., state: str | None = ..., prefill_instance: str | None = ..., decode_instance: str | None = ..., prompt_tokens: int | None = ..., output_tokens: int | None = ..., events: _Iterable[RequestEvent | _Mapping] | None = ...) -> None: ...

class ListRequestsRequest(_message.Message):
    __slots__ = ("limit", "request_id", "state")
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    state: str
    limit: int
    request_id: str
    def __init__(self, state: str | None = ..., limit: int | None = ..., request_id: str | None = ...) -> None: ...

class ListRequestsResponse(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RequestInfo]
    def __init__(self, requests: _Iterable[RequestInfo | _Mapping] | None = ...) -> None: ...
