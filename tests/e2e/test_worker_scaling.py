"""The pools resized on real engines through the controller's Ray actuator, as `pdctl scale` does it: a new
decode worker is started and serves; then the pool shrinks back while requests stream, the victim is drained
by live migration, and every stream ends whole. Runs last of the end-to-end modules (it reshapes the pools,
and may remove the worker the other modules know as the first decode worker)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import ray

from pdctl.admin_client import AdminClient
from pdctl.local_cluster import FRONTDOOR_NAME, NAMESPACE
from tests.e2e.conftest import E2ECluster

pytestmark = pytest.mark.e2e
TOKENS = 200


def _live_decode(cluster: E2ECluster) -> list[str]:
    return _live(cluster, "decode")


def _live(cluster: E2ECluster, role: str) -> list[str]:
    with AdminClient(cluster.admin_address) as admin:
        return sorted(i.instance_id for i in admin.instances(role).instances if i.state == "READY")


def _stream(cluster: E2ECluster, k: int) -> tuple[int, str, str]:
    """One streamed completion: (tokens, finish reason, error)."""
    body = {
        "model": cluster.model,
        "prompt": f"Tell a long story about a lighthouse keeper, part {k}.",
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens, finish = 0, ""
    with httpx.stream("POST", f"{cluster.http_url}/v1/completions", json=body, timeout=180) as resp:
        if resp.status_code != 200:
            return 0, "", f"HTTP {resp.status_code}: {resp.read()[:200]!r}"
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                return tokens, "", str(chunk["error"])
            for choice in chunk.get("choices", []):
                finish = choice.get("finish_reason") or finish
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, finish, ""


def test_scale_out_then_in_under_load_loses_no_request(e2e_cluster: E2ECluster) -> None:
    cluster = e2e_cluster
    before = _live_decode(cluster)
    prefill = len(_live(cluster, "prefill"))
    with AdminClient(cluster.admin_address) as admin:
        out = admin.scale(prefill, len(before) + 1, deadline_s=120)
    assert out.manual and any("starting decode-" in a for a in out.actions), out
    deadline = time.monotonic() + 300
    while len(_live_decode(cluster)) != len(before) + 1:
        assert time.monotonic() < deadline, (
            f"no new decode worker serving after 300 s: {_live_decode(cluster)}"
        )
        time.sleep(0.5)
    (new,) = set(_live_decode(cluster)) - set(before)
    deadline = time.monotonic() + 30
    while httpx.get(f"{cluster.http_url}/health", timeout=10).json()["decode_workers"] != len(before) + 1:
        assert time.monotonic() < deadline, f"the front door never saw {new}"
        time.sleep(0.05)

    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(_stream, cluster, k) for k in range(8)]
        deadline = time.monotonic() + 60
        while not all(_busy(cluster, i) for i in (*before, new)):  # requests running on every decode worker
            assert time.monotonic() < deadline, "the requests never spread over the decode workers"
            time.sleep(0.05)
        with AdminClient(cluster.admin_address) as admin:
            shrink = admin.scale(prefill, len(before), deadline_s=300)
        results = [s.result(timeout=300) for s in streams]

    assert [r for r in results if r[2] or r[0] != TOKENS or r[1] != "length"] == [], results
    assert len(shrink.victims) == 1 and any("drained" in a for a in shrink.actions), shrink
    assert any("applied" in a for a in shrink.actions), shrink.actions
    (victim,) = shrink.victims
    assert victim not in _live_decode(cluster) and len(_live_decode(cluster)) == len(before)
    with pytest.raises(ValueError):  # its actor is gone
        ray.get_actor(f"pdflow-{victim}", namespace=NAMESPACE)
    _wait_nothing_held(cluster)


def _busy(cluster: E2ECluster, instance: str) -> bool:
    with AdminClient(cluster.admin_address) as admin:
        found = [i for i in admin.instances("decode").instances if i.instance_id == instance]
    return bool(found) and found[0].num_running > 0


def _wait_nothing_held(cluster: E2ECluster, timeout_s: float = 30.0) -> None:
    """The leak check on what is left: every live worker, the controller, the front door."""
    deadline = time.monotonic() + timeout_s
    while True:
        held: dict[str, Any] = {}
        with AdminClient(cluster.admin_address) as admin:
            for inst in admin.instances().instances:
                if inst.state == "READY":
                    actor = ray.get_actor(f"pdflow-{inst.instance_id}", namespace=NAMESPACE)
                    figures = ray.get(actor.leak_check.remote(), timeout=30)
                    if any(figures.values()):
                        held[inst.instance_id] = figures
            if admin.migrations(0).in_flight:
                held["controller"] = "migrations in flight"
        in_flight = ray.get(cluster.handle.actors[FRONTDOOR_NAME].requests_in_flight.remote(), timeout=30)
        if in_flight:
            held["frontdoor"] = in_flight
        if not held:
            return
        assert time.monotonic() < deadline, f"still held after {timeout_s} s: {held}"
        time.sleep(0.2)
