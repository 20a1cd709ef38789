"""Configuration: one pydantic model per component, composed into ``ClusterConfig`` (the models of the
``kv`` and ``autoscaler`` sections are in ``protocol.kv_config`` and ``protocol.scaling_config``). The YAML
file, the ``PDFLOW__SECTION__FIELD`` environment overrides and ``pdctl``'s ``--set`` all come from them."""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.kv_config import KVTransferConfig
from protocol.scaling_config import AutoscalerConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DispatchPolicyKind(enum.StrEnum):
    LEAST_LOADED = "least_loaded"  # Llumnix freeness
    ROUND_ROBIN = "round_robin"


class MigrationMode(enum.StrEnum):
    LIVE = "live"  # multi-stage pre-copy while the request keeps decoding (Llumnix)
    STOP_AND_COPY = "stop_and_copy"  # pause, copy every block, resume (baseline)
    RECOMPUTE = "recompute"  # the destination re-runs prompt plus generated tokens (baseline)


class RequestChoice(enum.StrEnum):
    """Which running request a decode worker gives up first when the migration policy moves one."""

    LEAST_KV_TO_COPY = "least_kv_to_copy"  # shortest migration, least downtime risk
    MOST_KV = "most_kv"  # frees the most room per migration
    LOWEST_PRIORITY = "lowest_priority"  # keep important requests where they are


class ModelConfig(_Section):
    name: str = Field("SmolLM2-135M-Instruct", description="Model name served at /v1/models.")
    path: Path | None = Field(
        None, description="Hugging Face model directory; empty means the embedded SmolLM2 (converted once)."
    )


class EngineConfig(_Section):
    max_model_len: int = Field(2048, ge=16, description="Context length (prompt + output tokens).")
    kv_cache_gib: int = Field(1, ge=1, description="KV cache per engine in GiB (VLLM_CPU_KVCACHE_SPACE).")
    kv_blocks: int | None = Field(
        None,
        ge=1,
        description=(
            "KV blocks per engine, overriding kv_cache_gib (vLLM num_gpu_blocks_override): a smaller cache"
            " for capacity experiments. Unset: as many as kv_cache_gib holds."
        ),
    )
    max_num_seqs: int = Field(32, ge=1, description="Most requests one engine runs at once.")
    enforce_eager: bool = Field(True, description="Skip graph capture (needed on CPU).")
    dtype: str = Field("bfloat16", description="Weights and KV dtype.")
    cpu_threads: int = Field(1, ge=1, description="OMP threads per engine on CPU.")
    prefix_caching: bool = Field(
        True, description="Reuse the KV of shared prompt prefixes (vLLM prefix caching)."
    )
    queue_wait_ms: float | None = Field(
        None,
        ge=0,
        description="vLLM's engine core and its worker process wait for each other's messages on a "
        "shared-memory queue; with this set they sleep until notified, and look at the queue again every "
        "this many ms. Unset: 10 on CPU, where vLLM's own wait (busy, for 1 s after each message) takes the "
        "cores that compute tokens; vLLM's own wait on GPU. 0: vLLM's own wait.",
    )
    device: str = Field("cpu", description="'cpu' (vllm-cpu) or 'cuda' (vllm on GPUs).")


class PoolConfig(_Section):
    replicas: int = Field(1, ge=0, description="Workers in this pool.")


class WorkerConfig(_Section):
    report_interval_s: float = Field(0.25, gt=0, description="How often a worker pushes its load snapshot.")
    nixl_base_port: int = Field(0, ge=0, description="First NIXL side-channel port; 0 picks free ports.")
    start_timeout_s: float = Field(300.0, gt=0, description="Deadline for an engine to start.")
    hung_timeout_s: float = Field(
        90.0,
        gt=0,
        description="An engine with requests in flight and no output from any of them for this long is hung "
        "(a stopped or deadlocked engine core): its worker reports DEAD and gets no new work. Longer than "
        "the longest prefill and KV wait (kv.timeout_s).",
    )


class ControllerConfig(_Section):
    heartbeat_timeout_s: float = Field(3.0, gt=0, description="A worker silent this long is marked dead.")
    snapshot_interval_s: float = Field(0.2, gt=0, description="How often snapshots go to the front doors.")
    admin_host: str = Field(
        "127.0.0.1",
        description="Address the admin gRPC server binds. Any but loopback needs the admin token "
        "(PDFLOW_ADMIN_TOKEN or PDFLOW_ADMIN_TOKEN_FILE), which every admin call must then carry.",
    )
    admin_port: int = Field(50052, ge=0, description="gRPC pdflow.v1.Admin port (0: a free port).")
    request_history: int = Field(10000, ge=10, description="Finished requests kept for ListRequests.")


class FrontDoorConfig(_Section):
    host: str = Field(
        "127.0.0.1",
        description="Address the HTTP and gRPC servers bind. Any but loopback needs API keys "
        "(PDFLOW_API_KEYS or PDFLOW_API_KEYS_FILE), which every call but /health must then carry.",
    )
    replicas: int = Field(
        1,
        ge=1,
        description="Front doors serving the cluster at once (pdctl up): the n-th (from 0) on http_port + n "
        "and grpc_port + n. Each admits and dispatches on its own; a load balancer spreads clients.",
    )
    http_port: int = Field(8000, ge=0, description="OpenAI-compatible HTTP port (0: a free port).")
    grpc_port: int = Field(50051, ge=0, description="gRPC pdflow.v1.Router port (0: a free port).")
    dispatch: DispatchPolicyKind = Field(DispatchPolicyKind.LEAST_LOADED, description="Dispatch policy.")
    prefill_timeout_s: float = Field(120.0, gt=0, description="Deadline for a prefill (queueing included).")
    token_timeout_s: float = Field(60.0, gt=0, description="Longest wait for the next token from decode.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when the client gives none.")
    max_waiting: int = Field(
        64,
        ge=1,
        description="Requests this front door holds waiting for their first token (queued or prefilling), "
        "per live prefill worker; one more is answered 429 with Retry-After before any compute is spent, "
        "instead of a 504 once prefill_timeout_s has passed.",
    )
    admission_slo_factor: float | None = Field(
        1.0,
        gt=0,
        description="Refuse (429, Retry-After) a request whose first token would come later than the TTFT "
        "SLO (autoscaler.ttft_slo_s) times this: predicted from the prompt tokens waiting ahead of it on "
        "this front door, plus its own, over the rate the prefill pool has been serving them (learned from "
        "the first tokens). 1: what is admitted meets the SLO, the excess of an overload is refused at once. "
        "Larger: bursts queue longer. Unset: only max_waiting bounds the queue.",
    )
    max_concurrent_per_key: int = Field(
        0,
        ge=0,
        description="Requests one API key may have in flight on this front door; one more is answered 429 "
        "with Retry-After (every caller without a key counts as one key). 0: no limit.",
    )
    max_body_bytes: int = Field(
        1 << 20,
        ge=1024,
        description="Largest HTTP request body read (bytes); a larger one is answered 413 before it is "
        "parsed. 1 MiB holds far more than any prompt a 2048-token context takes.",
    )
    tls_cert_file: Path | None = Field(
        None,
        description="PEM certificate chain: with tls_key_file, the HTTP API is served over HTTPS and the "
        "gRPC Router over TLS. Unset: plain text (behind a TLS-terminating proxy, or on loopback).",
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")

    @model_validator(mode="after")
    def _tls_pair(self) -> FrontDoorConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "frontdoor.tls_cert_file and frontdoor.tls_key_file go together: set both or none"
            )
        return self

    def tls_pair(self) -> tuple[bytes, bytes] | None:
        """(certificate chain, private key) PEM bytes, read now; None without TLS."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        return self.tls_cert_file.read_bytes(), self.tls_key_file.read_bytes()


class TracingConfig(_Section):
    otlp_endpoint: str = Field(
        "",
        description="OTLP/HTTP traces endpoint (such as http://otel-collector:4318/v1/traces): each front "
        "door exports a span per request, with a child per stage (queue, prefill, transfer, decode, "
        "migration), each carrying the request id. Empty: no tracing.",
    )
    sample_ratio: float = Field(1.0, ge=0, le=1, description="Share of requests traced.")
    service_name: str = Field("pdflow", description="The traces' service.name.")


class MigrationConfig(_Section):
    mode: MigrationMode = Field(
        MigrationMode.LIVE, description="How a running request moves between workers."
    )
    max_stages: int = Field(3, ge=0, description="Pre-copy stages before the final, paused copy (live mode).")
    final_blocks: int = Field(
        4, ge=0, description="Pause and copy the rest once at most this many KV blocks are left (live mode)."
    )
    timeout_s: float = Field(60.0, gt=0, description="Deadline for one migration, all stages included.")
    overlap_last_push: bool = Field(
        False,
        description="Hand the request over as its last push starts: the destination copies the earlier "
        "stages in while it travels, and runs the request a step after it lands. Off (the default, measured "
        "faster): hand over once it has landed, and the destination loads everything in the step that "
        "computes the next token.",
    )
    prime_destination: bool = Field(
        True,
        description="Once the pre-copy stages landed, have the destination load them into its prefix cache "
        "(one step of one token, off the client's critical path), so that the paused step copies only the "
        "last stage. Needs prefix caching on the destination (live mode).",
    )
    prime_timeout_s: float = Field(
        5.0, gt=0, description="How long the migration waits for the destination's priming before going on."
    )
    auto: bool = Field(
        False, description="Let the migration policy move requests between decode workers on its own."
    )
    policy_interval_s: float = Field(0.5, gt=0, description="How often the migration policy runs (auto).")
    trigger_gap: float = Field(
        8.0,
        ge=0,
        description="Move only when decode workers' freeness (free KV blocks per request) differs more.",
    )
    max_concurrent: int = Field(2, ge=1, description="Policy migrations in flight at once, cluster-wide.")
    request_choice: RequestChoice = Field(
        RequestChoice.LEAST_KV_TO_COPY,
        description="Which running request a busy decode worker gives up first (least_kv_to_copy: the "
        "shortest migration; most_kv: frees the most room; lowest_priority: keeps important ones in place).",
    )
    headroom_blocks: int = Field(
        32,
        ge=0,
        description="KV blocks the policy keeps free on a decode worker per request of priority > 0.",
    )
    cooldown_s: float = Field(5.0, ge=0, description="A worker's pause between two policy moves.")


class PoolsKind(enum.StrEnum):
    """Who starts and stops the pools' workers (what ``pdctl scale`` and the autoscaler act through)."""

    RAY = "ray"  # worker actors the controller creates on the Ray cluster (pdctl up, KubeRay)
    KUBERNETES = "kubernetes"  # one pod per worker: the pools' Deployments or StatefulSets, through /scale


class WorkloadKind(enum.StrEnum):
    DEPLOYMENT = "Deployment"
    STATEFULSET = "StatefulSet"


class KubernetesConfig(_Section):
    pools: PoolsKind = Field(
        PoolsKind.RAY,
        description="Who starts the pools' workers: 'ray' (worker actors the controller creates) or "
        "'kubernetes' (the pods of each pool's Deployment or StatefulSet; the Helm chart sets this).",
    )
    namespace: str = Field("default", description="Namespace of the pools' workloads.")
    workload_kind: WorkloadKind = Field(
        WorkloadKind.DEPLOYMENT, description="The pools' workloads: Deployment or StatefulSet."
    )
    prefill_workload: str = Field("pdflow-prefill", description="Name of the prefill pool's workload.")
    decode_workload: str = Field("pdflow-decode", description="Name of the decode pool's workload.")
    kubeconfig: Path | None = Field(
        None, description="Kubeconfig to reach the API server; empty: the pod's service account."
    )


class ClusterConfig(_Section):
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    kv: KVTransferConfig = KVTransferConfig()
    prefill: PoolConfig = PoolConfig()
    decode: PoolConfig = PoolConfig()
    worker: WorkerConfig = WorkerConfig()
    controller: ControllerConfig = ControllerConfig()
    frontdoor: FrontDoorConfig = FrontDoorConfig()
    tracing: TracingConfig = TracingConfig()
    migration: MigrationConfig = MigrationConfig()
    autoscaler: AutoscalerConfig = AutoscalerConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()

    @model_validator(mode="after")
    def _ports_apart(self) -> ClusterConfig:
        """Every server this configuration starts on its own port (0: a free one each)."""
        fd = self.frontdoor
        servers = {"controller.admin_port": self.controller.admin_port}
        for n in range(fd.replicas):
            for what, port in (("http_port", fd.http_port), ("grpc_port", fd.grpc_port)):
                servers[f"front door {n}'s {what}" if n else f"frontdoor.{what}"] = port + n if port else 0
        seen: dict[int, str] = {}
        for what, port in servers.items():
            if port and port in seen:
                raise ValueError(f"{what} and {seen[port]} are both port {port}: give them different ports")
            seen[port] = what
        return self

    @property
    def max_predicted_ttft_s(self) -> float | None:
        """The front door's admission limit (``frontdoor.admission_slo_factor`` x the TTFT SLO), if any."""
        factor = self.frontdoor.admission_slo_factor
        return None if factor is None else factor * self.autoscaler.ttft_slo_s

    @classmethod
    def load(
        cls,
        path: Path | None = None,
        overrides: dict[str, Any] | None = None,
        environ: dict[str, str] | None = None,
    ) -> ClusterConfig:
        """File, then ``PDFLOW__SECTION__FIELD`` environment variables, then ``overrides`` (dotted keys)."""
        data: dict[str, Any] = {}
        if path is not None:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a mapping at the top level")
            data = loaded
        env = os.environ if environ is None else environ
        for key, value in env.items():
            if key.startswith("PDFLOW__"):
                _set_dotted(data, key[len("PDFLOW__") :].lower().replace("__", "."), value)
        for key, value in (overrides or {}).items():
            _set_dotted(data, key, value)
        return cls.model_validate(data)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
