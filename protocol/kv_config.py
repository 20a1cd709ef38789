"""The KV transfer settings (the ``kv`` section of ``ClusterConfig``): one pydantic model from the YAML file
to the connector inside vLLM's processes. The engine host hands ``KVTransferConfig.model_dump()`` to vLLM as
the connector's extra config, and the connector's first act is ``KVTransferConfig.from_connector`` on it:
every default is declared here once."""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class KVConnectorKind(enum.StrEnum):
    PDFLOW = "pdflow"  # pdflow's connector: compressed, layer-pipelined push over NIXL
    NIXL = "nixl"  # vLLM's NixlConnector (raw pull over NIXL/UCX), the baseline


class KVCodecKind(enum.StrEnum):
    """A KV codec, as configured and as named in every transfer's wire header. ``AUTO`` is a setting only
    (the adaptive policy picks one of the others per link); the rest name an encoder."""

    AUTO = "auto"
    NONE = "none"
    LOSSLESS = "lossless"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def compresses(self) -> bool:
        """Whether the codec changes the bytes (anything but ``none``): a compressed layer is staged,
        checksummed and decoded on arrival; a raw one can go straight from the KV cache."""
        return self not in (KVCodecKind.NONE, KVCodecKind.AUTO)


class KVQualityFloor(enum.StrEnum):
    """The least exact codec the adaptive policy may pick. Ranked by error measured on real SmolLM2 KV
    (``benchmarks/kv_codecs.py``): exact codecs, then int8 (~0.3-0.6% RMS), fp8 (~2.1-2.5%), int4 (~5-10%)."""

    LOSSLESS = "lossless"  # bit-exact KV only (none or lossless)
    INT8 = "int8"
    FP8 = "fp8"
    INT4 = "int4"


CPU_PRECOPY_GBPS = 0.1
"""The default cap on a live migration's pre-copy on a CPU engine: a 4096-token SmolLM2 request (94 MB)
pre-copies in about 0.9 s, over 15 or so of the source's steps. The copy's CPU cost is the same at any rate;
spread thinner, it costs each of the source's tokens less (two vCPUs, two engines, 4096 tokens: +30% and
+12% per token at 0.25 GB/s, +5% and +22% at 0.1 GB/s, runs of 4-9 migrations, so within the noise of this
machine), and the migrating request's own largest gap during the pre-copy fell from 80-166 to 63-115 ms."""


class KVTransferConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    connector: KVConnectorKind = Field(KVConnectorKind.PDFLOW, description="How KV moves prefill → decode.")
    codec: KVCodecKind = Field(
        KVCodecKind.AUTO,
        description="KV codec on the wire (pdflow connector): auto (per link, within quality_floor) or a "
        "fixed none, lossless, fp8, int8 or int4.",
    )
    quality_floor: KVQualityFloor = Field(
        KVQualityFloor.LOSSLESS, description="Least exact codec the adaptive policy (codec auto) may pick."
    )
    group_size: int = Field(64, ge=8, le=4096, description="Group size of the fp8/int8/int4 scales.")
    arena_mib: int = Field(256, ge=8, description="Registered staging memory per worker for KV transfers.")
    checksum: bool = Field(True, description="XXH3-64 of every layer, checked on arrival (resent once).")
    timeout_s: float = Field(
        30.0, gt=0, description="Deadline of one KV transfer, from reservation to commit."
    )
    keep_freed_mib: int = Field(
        256,
        ge=0,
        description="Freed heap memory (MiB) that glibc's malloc keeps, in a process that moves KV, for the "
        "next transfer's buffers instead of faulting in fresh pages; 0 keeps glibc's defaults.",
    )
    transfer_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="How much lower the priority of NIXL's threads (which move the KV bytes) is than the "
        "engine's: on CPU they share the cores that compute tokens; 0 keeps them equal.",
    )
    precopy_gbps: float | None = Field(
        None,
        ge=0,
        description="Cap on the rate of a live migration's pre-copy (GB/s), which copies the KV while the "
        "request keeps decoding on the source. Unset: 0.1 on CPU (the copy takes the cores and memory "
        "bandwidth of the source's forward pass), no cap on GPU; 0: no cap. The last push is never capped.",
    )
    precopy_pull: bool = Field(
        True,
        description="The destination of a live migration reads each pre-copy stage out of the source's KV "
        "cache (NIXL READ), so that the copy runs on the destination's CPU (the instance chosen for its "
        "headroom) rather than the source's (the loaded one); off: the source writes it. Only with "
        "zero_copy.",
    )
    side_channel_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Port of the worker's KV side channel (handshakes, push requests); 0: any free port, "
        "bound by the connector itself and reported back, so that two workers never race for one.",
    )
    side_channel_host: str = Field(
        "127.0.0.1",
        description="Address the worker's KV side channel binds and advertises: loopback on one machine, the "
        "pod's own IP in Kubernetes (the Helm chart sets it). Any but loopback needs the cluster secret "
        "(PDFLOW_CLUSTER_SECRET or PDFLOW_CLUSTER_SECRET_FILE, the same in every process), which signs "
        "every side-channel message.",
    )
    zero_copy: bool = Field(
        True,
        description="Migration pushes and raw hand-offs read blocks straight from the KV cache, registered "
        "with NIXL (no gather or staging copy, no checksum); off: they copy the blocks into staging first.",
    )
    lease_seconds: int = Field(
        12,
        ge=6,
        description="How long staged KV outlives its last sign of life: KV no decode worker has loaded is "
        "freed after it (a decode worker renews the KV of requests queued in its engine).",
    )

    def precopy_rate(self, device: str) -> float | None:
        """Bytes a second a pre-copy may average (None: no cap): ``precopy_gbps`` (0: no cap), or, unset,
        ``CPU_PRECOPY_GBPS`` for a KV cache in host memory and no cap on an accelerator (whose copies leave
        the compute alone)."""
        gbps = self.precopy_gbps
        if gbps is None:
            gbps = CPU_PRECOPY_GBPS if device == "cpu" else 0.0
        return gbps * 1e9 if gbps > 0 else None

    def to_connector(self) -> dict[str, Any]:
        """The connector's extra config in vLLM (``kv_connector_extra_config``): plain JSON values, since
        vLLM copies it into its engine-core and worker processes."""
        return self.model_dump(mode="json")

    @classmethod
    def from_connector(cls, extra: dict[str, Any] | None) -> KVTransferConfig:
        """The settings the engine host passed (``to_connector``); a key vLLM or a user added beside them
        is an error, so that a misspelt setting never silently takes the default."""
        return cls.model_validate(dict(extra or {}))
