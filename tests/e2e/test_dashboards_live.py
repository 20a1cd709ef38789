"""The dashboards' proof: a real Prometheus (Debian's package) scrapes the shared cluster's front door while
it serves streams whose KV moves between workers, while a decode worker is started and then drained away by
live migration (a scaling action and migrations), with the recording rules loaded; then every panel's query
of `deploy/grafana/*.json` goes through Prometheus' HTTP API and none may come back empty. Writes each query
and what it returned to `results/dashboard_queries.json`. Runs last (conftest): it reshapes the pools."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from pdctl.admin_client import AdminClient
from pdctl.local_cluster import free_port
from tests.e2e.conftest import E2ECluster, stream_completion

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
TOKENS = 120


@pytest.fixture(scope="module")
def prometheus(e2e_cluster: E2ECluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `make setup` installs it (Debian's prometheus package)"
    home = tmp_path_factory.mktemp("prometheus")
    target = urlparse(e2e_cluster.http_url).netloc
    (home / "prometheus.yml").write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ROOT / "deploy" / "prometheus" / "rules.yml")],
                "scrape_configs": [{"job_name": "pdflow", "static_configs": [{"targets": [target]}]}],
            }
        )
    )
    url = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={home / 'prometheus.yml'}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address={urlparse(url).netloc}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(home / "prometheus.log", "w"),  # noqa: SIM115  # closed with the process
    )
    try:
        _wait_for("Prometheus scraping the front door", lambda: _up(url), 60)
        yield url
    finally:
        server.terminate()
        server.wait(30)


def test_every_panel_query_returns_data_from_a_real_prometheus(
    e2e_cluster: E2ECluster, prometheus: str
) -> None:
    cluster = e2e_cluster
    started = time.monotonic()
    new = _scale_out_decode(cluster)
    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(_stream, cluster, k) for k in range(8)]
        _wait_for(f"requests running on {new}", lambda: _running(cluster, new) > 0, 60)
        with AdminClient(cluster.admin_address) as admin:
            prefill = len(_ready(cluster, "prefill"))
            shrink = admin.scale(prefill, len(_ready(cluster, "decode")) - 1, deadline_s=300)
        results = [s.result(timeout=300) for s in streams]
    assert [r for r in results if r[2]] == [], results
    assert any("moved" in a for a in shrink.actions), shrink.actions  # the drain migrated requests
    ended = time.time()
    _wait_for("two scrapes after the traffic", lambda: _last_scrape(prometheus) > ended + 2, 30)
    window = f"{math.ceil(time.monotonic() - started) + 30}s"  # rates over the whole run

    report: dict[str, Any] = {}
    empty = []
    for path in sorted((ROOT / "deploy" / "grafana").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", window)
                result = _query(prometheus, expr)
                where = f"{path.stem}: {panel['title']} [{target['legendFormat']}]"
                report[where] = {
                    "expr": expr,
                    "values": {_labels(r["metric"]): r["value"][1] for r in result},
                }
                if not any(math.isfinite(float(r["value"][1])) for r in result):  # nothing, or only NaN
                    empty.append(where)
    out = ROOT / "results" / "dashboard_queries.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    assert empty == [], f"panels with no data (see {out}): {empty}"
    # the figures the traffic above must have moved
    assert _value(report, "overview: Time to first token [p99]") > 0
    assert _value(report, "kv-transfer: KV bytes/s, raw and on the wire [{{kind}}]") > 0
    assert _value(report, "migration: Migrations/s by trigger and outcome [{{trigger}} {{outcome}}]") > 0
    assert _value(report, "autoscaler: Decisions by reason [{{reason}}]") > 0
    assert _value(report, "overview: Requests in flight by state [{{state}}]") == 0  # all ended: none left


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _value(report: dict[str, Any], where: str) -> float:
    """The largest value a panel query returned (NaN counts as nothing)."""
    values = [float(v) for v in report[where]["values"].values()]
    return max((v for v in values if not math.isnan(v)), default=0.0)


def _labels(metric: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(metric.items())) or "-"


def _last_scrape(url: str) -> float:
    """Unix time of Prometheus' latest scrape of the front door."""
    result = _query(url, 'max(timestamp(up{job="pdflow"}))')
    return float(result[0]["value"][1]) if result else 0.0


def _up(url: str) -> bool:
    """Prometheus answers (503 until it has loaded) and has scraped the front door."""
    try:
        ready = httpx.get(f"{url}/-/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
    return ready and bool(_query(url, 'up{job="pdflow"} == 1'))


def _ready(cluster: E2ECluster, role: str) -> list[str]:
    with AdminClient(cluster.admin_address) as admin:
        return sorted(i.instance_id for i in admin.instances(role).instances if i.state == "READY")


def _running(cluster: E2ECluster, instance: str) -> int:
    with AdminClient(cluster.admin_address) as admin:
        return sum(i.num_running for i in admin.instances("decode").instances if i.instance_id == instance)


def _scale_out_decode(cluster: E2ECluster) -> str:
    before = _ready(cluster, "decode")
    prefill = len(_ready(cluster, "prefill"))
    with AdminClient(cluster.admin_address) as admin:
        admin.scale(prefill, len(before) + 1, deadline_s=120)
    _wait_for("a new decode worker serving", lambda: len(_ready(cluster, "decode")) == len(before) + 1, 300)
    (new,) = set(_ready(cluster, "decode")) - set(before)

    def seen() -> bool:
        health = httpx.get(f"{cluster.http_url}/health", timeout=10).json()
        return bool(health["decode_workers"] == len(before) + 1)

    _wait_for(f"the front door seeing {new}", seen, 30)
    return new


def _stream(cluster: E2ECluster, k: int) -> tuple[int, str, str]:
    return stream_completion(cluster, f"Describe a harbour at dawn, scene {k}.", TOKENS)


def _wait_for(what: str, cond: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        time.sleep(0.1)
