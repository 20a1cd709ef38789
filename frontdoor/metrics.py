"""The front door's Prometheus metrics (names prefixed ``pdflow_``). Latencies are observed per request;
per-instance figures (queues, KV usage, decode tokens/s, KV transfer counters) are read from the latest
cluster snapshot at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from protocol.kv_config import KVCodecKind
from protocol.snapshots import PAUSE_BUCKETS_S, AutoscalerTotals, ClusterSnapshot, MigrationTotals
from protocol.transfers import TransferOutcome, TransferRecord

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)


class FrontDoorMetrics:
    def __init__(self, snapshot: Callable[[], ClusterSnapshot]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "pdflow_time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "pdflow_time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pdflow_e2e_request_latency_seconds",
            "Request latency, arrival to last token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prefill_seconds = Histogram(
            "pdflow_prefill_seconds", "Prefill worker time per request.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.requests = Counter("pdflow_requests", "Finished requests by outcome.", ["outcome"], registry=r)
        self.prompt_tokens = Counter(
            "pdflow_prompt_tokens", "Prompt tokens of admitted requests.", registry=r
        )
        self.generation_tokens = Counter(
            "pdflow_generation_tokens", "Tokens streamed to clients.", registry=r
        )
        self.in_flight = Gauge(
            "pdflow_requests_in_flight",
            "Requests in this front door by lifecycle state.",
            ["state"],
            registry=r,
        )
        self.transfers = Counter(
            "pdflow_kv_transfers", "KV transfers by codec and outcome.", ["codec", "outcome"], registry=r
        )
        self.transfer_bytes = Counter(
            "pdflow_kv_transfer_bytes",
            "KV bytes, raw and on the wire, by codec.",
            ["codec", "kind"],
            registry=r,
        )
        self.transfer_ratio = Histogram(
            "pdflow_kv_transfer_compression_ratio",
            "Wire bytes over raw bytes per transfer.",
            ["codec"],
            buckets=(0.2, 0.25, 0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0, 1.05),
            registry=r,
        )
        self.transfer_seconds = Histogram(
            "pdflow_kv_transfer_seconds",
            "KV transfer stage time (encode, wire, tail after the last layer, decode) by codec.",
            ["codec", "stage"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        r.register(_SnapshotCollector(snapshot))
        # Every series a dashboard sums exists from the first scrape at 0: a series born with its first
        # increments has no rate until its next one (Prometheus reads the first sample as the start).
        for outcome in ("stop", "length", "aborted", "error", "rejected"):
            self.requests.labels(outcome=outcome)
        # "unknown": a failed transfer may not have chosen its codec yet
        for codec in (*(c.value for c in KVCodecKind if c is not KVCodecKind.AUTO), "unknown"):
            for transfer_outcome in TransferOutcome:
                self.transfers.labels(codec=codec, outcome=transfer_outcome.value)
            for kind in ("raw", "wire"):
                self.transfer_bytes.labels(codec=codec, kind=kind)

    def observe_transfer(self, record: TransferRecord) -> None:
        codec = record.codec or "unknown"
        self.transfers.labels(codec=codec, outcome=record.outcome.value).inc()
        if record.outcome is not TransferOutcome.SUCCESS:
            return
        self.transfer_bytes.labels(codec=codec, kind="raw").inc(record.raw_bytes)
        self.transfer_bytes.labels(codec=codec, kind="wire").inc(record.wire_bytes)
        self.transfer_ratio.labels(codec=codec).observe(record.ratio)
        for stage, seconds in (
            ("encode", record.encode_s),
            ("wire", record.wire_s),
            ("tail", record.tail_s),
            ("decode", record.decode_s),
        ):
            self.transfer_seconds.labels(codec=codec, stage=stage).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], ClusterSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        # not "instance": Prometheus gives every scraped series the scrape target's ``instance`` label
        labels = ["instance_id", "role"]
        gauges = {
            "running": GaugeMetricFamily(
                "pdflow_instance_requests_running", "Requests running.", labels=labels
            ),
            "waiting": GaugeMetricFamily(
                "pdflow_instance_requests_waiting", "Requests queued.", labels=labels
            ),
            "kv": GaugeMetricFamily(
                "pdflow_instance_kv_usage_ratio", "KV cache blocks in use, 0-1.", labels=labels
            ),
            "blocks": GaugeMetricFamily("pdflow_instance_kv_blocks_total", "KV cache blocks.", labels=labels),
            "tps": GaugeMetricFamily(
                "pdflow_instance_decode_tokens_per_second", "Decode tokens/s.", labels=labels
            ),
            "up": GaugeMetricFamily("pdflow_instance_up", "1 if the instance takes requests.", labels=labels),
        }
        # per instance, from its connector's reports; named apart from the front door's per-transfer
        # ``pdflow_kv_transfer*`` series so that a sum over one name never counts a transfer twice
        transfer_bytes = CounterMetricFamily(
            "pdflow_instance_kv_received_bytes",
            "KV bytes the instance received over the connector.",
            labels=labels,
        )
        transfer_seconds = CounterMetricFamily(
            "pdflow_instance_kv_transfer_seconds",
            "Seconds the instance spent in KV transfers.",
            labels=labels,
        )
        transfers = CounterMetricFamily(
            "pdflow_instance_kv_transfers",
            "KV transfers the instance took part in, by outcome.",
            labels=[*labels, "outcome"],
        )
        for inst in self._snapshot().instances:
            lv = [inst.instance_id, inst.role.value]
            gauges["running"].add_metric(lv, inst.num_running)
            gauges["waiting"].add_metric(lv, inst.num_waiting)
            gauges["kv"].add_metric(lv, inst.kv_usage)
            gauges["blocks"].add_metric(lv, inst.kv_blocks_total)
            gauges["tps"].add_metric(lv, inst.decode_tps)
            gauges["up"].add_metric(lv, 1.0 if inst.state.schedulable else 0.0)
            transfer_bytes.add_metric(lv, inst.transfer.bytes)
            transfer_seconds.add_metric(lv, inst.transfer.seconds)
            transfers.add_metric([*lv, "success"], inst.transfer.transfers)
            transfers.add_metric([*lv, "failed"], inst.transfer.failed)
        yield from gauges.values()
        yield from (transfer_bytes, transfer_seconds, transfers)
        yield from _migration_metrics(self._snapshot().migrations)
        if (scaling := self._snapshot().autoscaler) is not None:
            yield from _autoscaler_metrics(scaling)


def _migration_metrics(totals: MigrationTotals) -> Iterator[Metric]:
    count = CounterMetricFamily(
        "pdflow_migrations", "Live migrations by trigger and outcome.", labels=["trigger", "outcome"]
    )
    for trigger, outcome, n in totals.counts:
        count.add_metric([trigger, outcome], n)
    moved = CounterMetricFamily("pdflow_migration_bytes", "KV bytes moved by live migrations.")
    moved.add_metric([], totals.wire_bytes)
    pause = HistogramMetricFamily(
        "pdflow_migration_pause_seconds", "Seconds a migrated request's stream was frozen (its downtime)."
    )
    buckets = [
        (str(bound), n)
        for bound, n in zip(PAUSE_BUCKETS_S, totals.paused_buckets or [0] * len(PAUSE_BUCKETS_S), strict=True)
    ]
    pause.add_metric([], [*buckets, ("+Inf", totals.paused_count)], totals.paused_sum_s)
    yield from (count, moved, pause)


def _autoscaler_metrics(totals: AutoscalerTotals) -> Iterator[Metric]:
    per_pool = {
        what: GaugeMetricFamily(f"pdflow_autoscaler_{what}_replicas", help_, labels=["role"])
        for what, help_ in (
            ("desired", "Instances the autoscaler wants in the pool (in service or on their way)."),
            ("ready", "Instances of the pool in service."),
            ("pending", "Instances of the pool on their way (not scheduled, or the engine starting)."),
            ("draining", "Instances of the pool on their way out: cordoned, draining, drained or kept warm."),
        )
    }
    for role, desired, ready, pending, draining in totals.pools:
        for what, n in (("desired", desired), ("ready", ready), ("pending", pending), ("draining", draining)):
            per_pool[what].add_metric([role], n)
    decisions = CounterMetricFamily(
        "pdflow_autoscaler_decisions", "Autoscaler decisions by reason.", labels=["reason"]
    )
    for reason, n in totals.decisions:
        decisions.add_metric([reason], n)
    metric = GaugeMetricFamily(
        "pdflow_autoscaler_metric",
        "The figure the autoscaler scales each pool on, per pool.",
        labels=["role"],
    )
    metric.add_metric(["decode"], totals.decode_tps)  # decode tokens/s
    metric.add_metric(["prefill"], totals.prefill_miss_tps)  # cache-miss prompt tokens/s
    target = GaugeMetricFamily(
        "pdflow_autoscaler_target",
        "What one instance of each pool should carry, in the units of pdflow_autoscaler_metric.",
        labels=["role"],
    )
    target.add_metric(["decode"], totals.target_decode_tps)
    target.add_metric(["prefill"], totals.target_prefill_tps)
    paused = GaugeMetricFamily("pdflow_autoscaler_paused", "1 while the autoscaler's policy does not act.")
    paused.add_metric([], 1.0 if totals.paused else 0.0)
    enabled = GaugeMetricFamily(
        "pdflow_autoscaler_enabled",
        "1 if autoscaler.enabled (the policy may act; otherwise manual targets only).",
    )
    enabled.add_metric([], 1.0 if totals.enabled else 0.0)
    yield from (*per_pool.values(), decisions, metric, target, paused, enabled)
