"""The Grafana dashboards (`deploy/grafana/`) and the Prometheus rules (`deploy/prometheus/rules.yml`) against
the metrics the code exports: a panel or an alert that names a metric nobody exports, or reads a counter
without `rate()`, shows a flat line or never fires, and nobody notices until the day it matters."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from frontdoor.metrics import FrontDoorMetrics
from protocol.ids import InstanceId
from protocol.instances import InstanceState
from protocol.snapshots import (
    AutoscalerTotals,
    ClusterSnapshot,
    InstanceSnapshot,
    MigrationTotals,
    Role,
    TransferCounters,
)
from protocol.transfers import TransferOutcome, TransferRecord

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
_NAME = re.compile(r"\bpdflow_[a-z0-9_]+\b")
_RATED = re.compile(r"\b(?:rate|irate|increase)\(\s*$")


def _build() -> Any:
    spec = importlib.util.spec_from_file_location("grafana_build", GRAFANA / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _exported() -> dict[str, str]:
    """Every series name the front door exports (``pdflow_requests_total``, ``..._bucket``: what a query
    names, not the family name ``pdflow_requests``): its family's type. Each labelled family gets a sample."""
    instances = tuple(
        InstanceSnapshot(
            InstanceId(f"{role.value}-0"),
            role,
            InstanceState.READY,
            f"pdflow-{role.value}-0",
            transfer=TransferCounters(transfers=1, bytes=10),
        )
        for role in (Role.PREFILL, Role.DECODE)
    )
    snapshot = ClusterSnapshot(
        1,
        instances,
        migrations=MigrationTotals(counts=(("drain", "moved", 1),), wire_bytes=1),
        autoscaler=AutoscalerTotals(pools=(("decode", 1, 1, 0, 0),), decisions=(("steady", 1),)),
    )
    metrics = FrontDoorMetrics(lambda: snapshot)
    metrics.requests.labels(outcome="stop").inc()
    metrics.in_flight.labels(state="DECODING").set(1)
    metrics.observe_transfer(TransferRecord("t", "r", TransferOutcome.SUCCESS, codec="int8", raw_bytes=2))
    text = metrics.exposition()[0].decode()
    declared = re.findall(r"^# TYPE (\S+)", text, re.MULTILINE)
    twice = sorted({n for n in declared if declared.count(n) > 1})
    assert twice == [], f"exported as two families under one name (a sum would count both): {twice}"
    return {
        sample.name: family.type
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard panel and every rule."""
    out = []
    for path in sorted(GRAFANA.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                out.append((f"{path.name}: {panel['title']}", target["expr"]))
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            out.append((f"rules.yml: {rule.get('alert') or rule.get('record')}", rule["expr"]))
    return out


def test_the_dashboards_are_what_build_py_writes() -> None:
    written = {p.name: p.read_text() for p in GRAFANA.glob("*.json")}
    assert written == _build().render(), "run: .venv/bin/python deploy/grafana/build.py"


def _problems(queries: list[tuple[str, str]], exported: dict[str, str], recorded: set[str]) -> list[str]:
    problems = []
    for where, expr in queries:
        for m in _NAME.finditer(expr):
            name = m[0]
            kind = exported.get(name)
            if kind is None:
                problems.append(f"{where}: {name} is not exported")
            elif kind in ("counter", "histogram") and not _RATED.search(expr[: m.start()]):
                problems.append(f"{where}: {kind} {name} read without rate()/increase()")
        for name in re.findall(r"\bpdflow:[a-z0-9_:]+", expr):
            if name not in recorded:
                problems.append(f"{where}: recording rule {name} does not exist")
    return problems


def _recorded() -> set[str]:
    return {
        r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r
    }


def test_every_metric_a_panel_or_rule_reads_is_exported_and_counters_are_rated() -> None:
    queries = _queries()
    assert _problems(queries, _exported(), _recorded()) == []
    assert len(queries) >= 40  # five dashboards and the rules: the check saw them all


def test_the_check_catches_what_the_peers_dashboards_get_wrong() -> None:
    """The control case: a counter averaged without rate() (production-stack), a metric name the code no
    longer exports (Dynamo's planner dashboard), a recording rule that does not exist."""
    bad = [
        ("avg", "avg(pdflow_requests_total)"),
        ("gone", "sum(rate(pdflow_kv_transfer_bytes_received_total[5m]))"),
        ("rule", "pdflow:nothing:p99 > 1"),
        ("family", "sum(rate(pdflow_requests[5m]))"),  # the family's name: no series has it
        ("fine", "histogram_quantile(0.99, sum by (le) (rate(pdflow_prefill_seconds_bucket[5m])))"),
    ]
    assert _problems(bad, _exported(), _recorded()) == [
        "avg: counter pdflow_requests_total read without rate()/increase()",
        "gone: pdflow_kv_transfer_bytes_received_total is not exported",
        "rule: recording rule pdflow:nothing:p99 does not exist",
        "family: pdflow_requests is not exported",
    ]


@pytest.mark.parametrize("name", sorted(p.name for p in GRAFANA.glob("*.json")))
def test_each_panel_has_a_unique_id_a_unit_and_a_query(name: str) -> None:
    board = json.loads((GRAFANA / name).read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), ids
    for panel in board["panels"]:
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make setup` installs it (Debian's prometheus package)"
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    checked = _promtool("check", "rules", "rules.yml", cwd=RULES.parent)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", "rules_test.yml", cwd=RULES.parent)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_the_rules_unit_tests_fail_when_an_alert_changes(tmp_path: Path) -> None:
    """The control case: an alert that waits 60 minutes instead of 10 no longer fires when the test says."""
    rules = RULES.read_text()
    late = rules.replace(
        "expr: pdflow:time_to_first_token_seconds:p99_5m > 2\n        for: 10m",
        "expr: pdflow:time_to_first_token_seconds:p99_5m > 2\n        for: 60m",
    )
    assert late != rules
    (tmp_path / "rules.yml").write_text(late)
    (tmp_path / "rules_test.yml").write_text((RULES.parent / "rules_test.yml").read_text())
    tested = _promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    failed = tested.stdout + tested.stderr
    assert tested.returncode != 0 and "alertname: PdflowTTFTOverSLO" in failed, failed
