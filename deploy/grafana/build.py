"""The Grafana dashboards, as code: each panel is a title, a unit and its PromQL; this script writes the JSON
files beside it (`python deploy/grafana/build.py`), which Grafana imports (the Helm chart will provision
them). A test rebuilds them and fails when the JSON and this file disagree, and checks every query against the
metrics the code exports (names, counters only through `rate()`/`increase()`, a unit on every panel).

Every front door exports the controller's figures (instances, migrations, the autoscaler) from the same
snapshot: those are aggregated with `max`, never `sum`. Per-request figures (latencies, outcomes, KV
transfers) are each front door's own and are summed."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[tuple[str, str], ...]  # (PromQL, legend)
    kind: str = "timeseries"
    width: int = 12


def q(expr: str, legend: str = "") -> tuple[str, str]:
    return expr, legend


def quantiles(metric: str, by: str = "", agg: str = "sum") -> tuple[tuple[str, str], ...]:
    """p50 and p99 of a histogram over the rate interval."""
    keys = f"le, {by}" if by else "le"
    label = f"{{{{{by}}}}} " if by else ""
    return tuple(
        q(
            f"histogram_quantile({p}, {agg} by ({keys}) (rate({metric}_bucket[{RATE}])))",
            f"{label}p{int(p * 100)}",
        )
        for p in (0.5, 0.99)
    )


DASHBOARDS: dict[str, tuple[str, tuple[Panel, ...]]] = {
    "overview": (
        "pdflow: overview",
        (
            Panel(
                "Requests/s by outcome",
                "reqps",
                (q(f"sum by (outcome) (rate(pdflow_requests_total[{RATE}]))", "{{outcome}}"),),
            ),
            Panel(
                "Error ratio (errors and rejections over all finished)",
                "percentunit",
                (
                    q(
                        f'(sum(rate(pdflow_requests_total{{outcome=~"error|rejected"}}[{RATE}]))'
                        " or vector(0))"
                        f" / clamp_min(sum(rate(pdflow_requests_total[{RATE}])), 1e-9)",
                        "errors",
                    ),
                ),
            ),
            Panel("Time to first token", "s", quantiles("pdflow_time_to_first_token_seconds")),
            Panel("Time per output token", "s", quantiles("pdflow_time_per_output_token_seconds")),
            Panel("End-to-end latency", "s", quantiles("pdflow_e2e_request_latency_seconds")),
            Panel(
                "Requests in flight by state",
                "short",
                (q("sum by (state) (pdflow_requests_in_flight)", "{{state}}"),),
            ),
            Panel(
                "Tokens/s",
                "short",
                (
                    q(f"sum(rate(pdflow_prompt_tokens_total[{RATE}]))", "prompt"),
                    q(f"sum(rate(pdflow_generation_tokens_total[{RATE}]))", "generated"),
                ),
            ),
            Panel("Prefill worker time per request", "s", quantiles("pdflow_prefill_seconds")),
        ),
    ),
    "pools": (
        "pdflow: pools",
        (
            Panel(
                "Requests running",
                "short",
                (
                    q(
                        "max by (instance_id, role) (pdflow_instance_requests_running)",
                        "{{role}} {{instance_id}}",
                    ),
                ),
            ),
            Panel(
                "Requests waiting",
                "short",
                (
                    q(
                        "max by (instance_id, role) (pdflow_instance_requests_waiting)",
                        "{{role}} {{instance_id}}",
                    ),
                ),
            ),
            Panel(
                "KV cache in use",
                "percentunit",
                (
                    q(
                        "max by (instance_id, role) (pdflow_instance_kv_usage_ratio)",
                        "{{role}} {{instance_id}}",
                    ),
                ),
            ),
            Panel(
                "Decode tokens/s",
                "short",
                (
                    q(
                        'max by (instance_id) (pdflow_instance_decode_tokens_per_second{role="decode"})',
                        "{{instance_id}}",
                    ),
                ),
            ),
            Panel(
                "Instances taking requests",
                "short",
                (q("sum by (role) (max by (instance_id, role) (pdflow_instance_up))", "{{role}}"),),
            ),
            Panel(
                "KV cache blocks",
                "short",
                (
                    q(
                        "max by (instance_id, role) (pdflow_instance_kv_blocks_total)",
                        "{{role}} {{instance_id}}",
                    ),
                ),
            ),
        ),
    ),
    "kv-transfer": (
        "pdflow: KV transfer",
        (
            Panel(
                "KV bytes/s, raw and on the wire",
                "Bps",
                (q(f"sum by (kind) (rate(pdflow_kv_transfer_bytes_total[{RATE}]))", "{{kind}}"),),
            ),
            Panel(
                "Wire bytes over raw bytes, by codec",
                "percentunit",
                (
                    q(
                        f'sum by (codec) (rate(pdflow_kv_transfer_bytes_total{{kind="wire"}}[{RATE}])) '
                        f'/ sum by (codec) (rate(pdflow_kv_transfer_bytes_total{{kind="raw"}}[{RATE}]))',
                        "{{codec}}",
                    ),
                ),
            ),
            Panel(
                "Transfers/s by codec and outcome",
                "ops",
                (
                    q(
                        f"sum by (codec, outcome) (rate(pdflow_kv_transfers_total[{RATE}]))",
                        "{{codec}} {{outcome}}",
                    ),
                ),
            ),
            Panel(
                "Transfer stage time p99, by codec and stage",
                "s",
                (
                    q(
                        "histogram_quantile(0.99, sum by (le, codec, stage) "
                        f"(rate(pdflow_kv_transfer_seconds_bucket[{RATE}])))",
                        "{{codec}} {{stage}}",
                    ),
                ),
            ),
            Panel(
                "Failed transfers/s",
                "ops",
                (
                    q(
                        f'sum(rate(pdflow_kv_transfers_total{{outcome!="success"}}[{RATE}])) or vector(0)',
                        "failed or aborted",
                    ),
                    q(
                        "sum(max by (instance_id) "
                        f'(rate(pdflow_instance_kv_transfers_total{{outcome="failed"}}[{RATE}])))'
                        " or vector(0)",
                        "failed, as the receivers report",
                    ),
                ),
            ),
            Panel(
                "KV bytes/s received, per instance",
                "Bps",
                (
                    q(
                        f"max by (instance_id) (rate(pdflow_instance_kv_received_bytes_total[{RATE}]))",
                        "{{instance_id}}",
                    ),
                ),
            ),
        ),
    ),
    "migration": (
        "pdflow: live migration",
        (
            Panel(
                "Migrations/s by trigger and outcome",
                "ops",
                (
                    q(
                        f"max by (trigger, outcome) (rate(pdflow_migrations_total[{RATE}]))",
                        "{{trigger}} {{outcome}}",
                    ),
                ),
            ),
            Panel(
                "Stream pause of a migrated request",
                "s",
                quantiles("pdflow_migration_pause_seconds", agg="max"),
            ),
            Panel(
                "KV bytes/s moved by migrations",
                "Bps",
                (q(f"max(rate(pdflow_migration_bytes_total[{RATE}]))", "moved"),),
            ),
        ),
    ),
    "autoscaler": (
        "pdflow: autoscaler",
        (
            Panel(
                "Decode pool: desired, ready, pending, draining",
                "short",
                tuple(
                    q(f'max(pdflow_autoscaler_{what}_replicas{{role="decode"}})', what)
                    for what in ("desired", "ready", "pending", "draining")
                ),
            ),
            Panel(
                "Prefill pool: desired, ready, pending, draining",
                "short",
                tuple(
                    q(f'max(pdflow_autoscaler_{what}_replicas{{role="prefill"}})', what)
                    for what in ("desired", "ready", "pending", "draining")
                ),
            ),
            Panel(
                "Decode tokens/s against the ready instances' target",
                "short",
                (
                    q('max(pdflow_autoscaler_metric{role="decode"})', "decode tokens/s"),
                    q(
                        'max(pdflow_autoscaler_target{role="decode"}) '
                        '* max(pdflow_autoscaler_ready_replicas{role="decode"})',
                        "target x ready",
                    ),
                ),
            ),
            Panel(
                "Cache-miss prompt tokens/s against the ready instances' target",
                "short",
                (
                    q('max(pdflow_autoscaler_metric{role="prefill"})', "prompt tokens/s"),
                    q(
                        'max(pdflow_autoscaler_target{role="prefill"}) '
                        '* max(pdflow_autoscaler_ready_replicas{role="prefill"})',
                        "target x ready",
                    ),
                ),
            ),
            Panel(
                "Decisions by reason",
                "short",
                (
                    q(
                        f"max by (reason) (increase(pdflow_autoscaler_decisions_total[{RATE}]))",
                        "{{reason}}",
                    ),
                ),
            ),
            Panel(
                "Paused (1: the policy does not act)",
                "short",
                (q("max(pdflow_autoscaler_paused)", "paused"),),
            ),
        ),
    ),
}


def dashboard(uid: str, title: str, panels: tuple[Panel, ...]) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    x = y = 0
    for k, p in enumerate(panels, start=1):
        if x + p.width > 24:
            x, y = 0, y + 8
        out.append(
            {
                "id": k,
                "type": p.kind,
                "title": p.title,
                "gridPos": {"x": x, "y": y, "w": p.width, "h": 8},
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [
                    {
                        "refId": chr(ord("A") + i),
                        "expr": expr,
                        "legendFormat": legend,
                        "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    }
                    for i, (expr, legend) in enumerate(p.queries)
                ],
            }
        )
        x += p.width
    return {
        "uid": f"pdflow-{uid}",
        "title": title,
        "tags": ["pdflow"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                }
            ]
        },
        "panels": out,
    }


def render() -> dict[str, str]:
    """File name -> JSON text, for every dashboard."""
    return {
        f"{uid}.json": json.dumps(dashboard(uid, title, panels), indent=2) + "\n"
        for uid, (title, panels) in DASHBOARDS.items()
    }


def main() -> None:
    for name, text in render().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}", file=sys.stderr)


if __name__ == "__main__":
    main()
