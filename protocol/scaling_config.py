"""The autoscaler's settings (the ``autoscaler`` section of ``ClusterConfig``): the one metric it scales on
and its target, the P:D shape, how fast it moves each way, the bounds and the budget, the latency SLOs it
defends, and how it scales in softly. Read by the pure policy (``policy.scaling``) and by the controller's
loop that runs it."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_SHAPE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class AutoscalerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(False, description="Run the autoscaler (pdctl up --autoscale turns it on).")
    interval_s: float = Field(5.0, gt=0, description="How often the policy looks at the cluster (one tick).")
    target_decode_tps: float = Field(
        150.0,
        gt=0,
        description="Decode tokens/s one decode instance should carry: the decode pool is ceil(decode "
        "tokens/s / this). The one metric (HeteroScale): decode utilisation stays high even when idle.",
    )
    target_prefill_tps: float = Field(
        3000.0,
        gt=0,
        description="Cache-miss prompt tokens/s one prefill instance should carry; a second check that can "
        "raise the prefill pool above what the shape gives (prefix-cache hits cost no prefill).",
    )
    shape: str = Field(
        "1:1",
        description="P:D ratio as 'p:d': the prefill pool is ceil(decode pool x p / d) (rounded up, never "
        "an accidental mix such as 9P:4D), or more under prefill pressure.",
    )
    dead_band: float = Field(
        0.10, ge=0, lt=1, description="No change while decode tokens/s is within this share of the target."
    )
    out_ticks: int = Field(1, ge=1, description="Consecutive ticks over target before scaling out (fast).")
    in_ticks: int = Field(6, ge=1, description="Consecutive ticks under target before scaling in (slow).")
    min_prefill: int = Field(1, ge=0, description="Fewest prefill instances.")
    max_prefill: int = Field(4, ge=0, description="Most prefill instances.")
    min_decode: int = Field(1, ge=0, description="Fewest decode instances.")
    max_decode: int = Field(4, ge=0, description="Most decode instances.")
    max_instances: int = Field(8, ge=0, description="Budget: instances of both pools, pending ones included.")
    max_accelerators: int = Field(
        8, ge=0, description="Budget: accelerators of both pools, pending included."
    )
    accelerators_per_prefill: int = Field(
        1, ge=0, description="Accelerators (GPUs) one prefill instance uses."
    )
    accelerators_per_decode: int = Field(1, ge=0, description="Accelerators (GPUs) one decode instance uses.")
    ttft_slo_s: float = Field(2.0, gt=0, description="Time-to-first-token SLO (p99), seconds.")
    tpot_slo_s: float = Field(0.2, gt=0, description="Time-per-output-token SLO (p99), seconds.")
    severe_breach: float = Field(
        1.5,
        gt=1,
        description="A p99 over its SLO raises the capacity asked for by 10%; over SLO x this, by 20%. "
        "Latency never causes a scale-in.",
    )
    consolidation_sensitivity: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Scale in only if each survivor would carry under target x this (load x N/(N-1)).",
    )
    kv_limit: float = Field(
        0.9, gt=0, le=1, description="...and its KV cache would stay under this share of its blocks."
    )
    metric_window_s: float = Field(
        30.0,
        ge=0,
        description="Decode and cache-miss prompt tokens/s are averaged over this many seconds of reports "
        "(the engines' own rates are over a few seconds: bursts would move the pools). 0: the latest.",
    )
    latency_window_s: float = Field(
        30.0, gt=0, description="The p99 latencies are over the requests that finished this recently."
    )
    latency_min_samples: int = Field(
        10,
        ge=1,
        description="Fewer finished requests than this in the window: no p99 (one slow request is no trend).",
    )
    warm_s: float = Field(
        60.0,
        ge=0,
        description="A drained victim of a scale-in stays warm this long, put back at once if an SLO "
        "regresses, before it is removed.",
    )

    @field_validator("shape")
    @classmethod
    def _shape(cls, value: str) -> str:
        match = _SHAPE.match(value)
        if match is None or int(match[1]) < 1 or int(match[2]) < 1:
            raise ValueError(
                f"shape must be 'p:d' with whole numbers of at least 1, such as '1:2'; got {value!r}"
            )
        return f"{int(match[1])}:{int(match[2])}"

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalerConfig:
        for role in ("prefill", "decode"):
            low, high = getattr(self, f"min_{role}"), getattr(self, f"max_{role}")
            if low > high:
                raise ValueError(f"min_{role} ({low}) is above max_{role} ({high})")
        return self

    @property
    def ratio(self) -> tuple[int, int]:
        """The shape as (p, d)."""
        p, d = self.shape.split(":")
        return int(p), int(d)
