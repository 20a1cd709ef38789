"""The pools resized on real engines through the controller's Ray actuator, as `pdctl scale` and `pdctl
set-role` do it: a new decode worker is started and serves; a decode worker switches to prefill and back in
place while requests stream; then the pool shrinks back while requests stream, the victim is drained by live
migration, and every stream ends whole. Runs last of the end-to-end modules (it reshapes the pools,
and may remove the worker the other modules know as the first decode worker)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import ray

from pdctl.admin_client import AdminClient
from pdctl.local_cluster import FRONTDOOR_NAME, NAMESPACE
from tests.e2e.conftest import E2ECluster, stream_completion

pytestmark = pytest.mark.e2e
TOKENS = 200


def _live_decode(cluster: E2ECluster) -> list[str]:
    return _live(cluster, "decode")


def _live(cluster: E2ECluster, role: str) -> list[str]:
    with AdminClient(cluster.admin_address) as admin:
        return sorted(i.instance_id for i in admin.instances(role).instances if i.state == "READY")


def _stream(cluster: E2ECluster, k: int) -> tuple[int, str, str]:
    return stream_completion(cluster, f"Tell a long story about a lighthouse keeper, part {k}.", TOKENS)


def test_scale_out_starts_a_decode_worker_that_serves(e2e_cluster: E2ECluster) -> None:
    before = _live_decode(e2e_cluster)
    new = _scale_out_decode(e2e_cluster)
    assert new not in before and len(_live_decode(e2e_cluster)) == len(before) + 1
    tokens, finish, error = _stream(e2e_cluster, 0)
    assert (tokens, finish, error) == (TOKENS, "length", ""), error


def test_a_decode_worker_switches_to_prefill_and_back_in_place_under_load(e2e_cluster: E2ECluster) -> None:
    cluster = e2e_cluster
    if len(_live_decode(cluster)) < 2:  # run alone: the pool needs a second decode worker to give one up
        _scale_out_decode(cluster)
    switched = _live_decode(cluster)[-1]
    actor_id = ray.get_actor(f"pdflow-{switched}", namespace=NAMESPACE)._actor_id
    with ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(_stream, cluster, k) for k in range(6)]
        _wait_for("requests on the worker to switch", lambda: _busy(cluster, switched), 60)
        with AdminClient(cluster.admin_address) as admin:
            there = admin.set_role(switched, "prefill", deadline_s=300)
        assert any(
            a.startswith(f"{switched}: drained") and "decode -> prefill in place" in a for a in there.actions
        ), there.actions
        assert switched in _live(cluster, "prefill") and switched not in _live_decode(cluster)
        _wait_for("the front door sending prompts to it", lambda: _front_door_sees(cluster, 2, 1), 30)
        more = [pool.submit(_stream, cluster, 100 + k) for k in range(4)]
        _wait_for("a prompt prefilled there", lambda: _prefilled_on(cluster, switched), 120)
        with AdminClient(cluster.admin_address) as admin:
            back = admin.set_role(switched, "decode", deadline_s=300)
        assert any(
            a.startswith(f"{switched}: drained") and "prefill -> decode in place" in a for a in back.actions
        ), back.actions
        results = [s.result(timeout=300) for s in (*streams, *more)]
    assert [r for r in results if r[2] or r[0] != TOKENS or r[1] != "length"] == [], results
    assert switched in _live_decode(cluster)
    # the same worker all along: not replaced by a new one
    assert ray.get_actor(f"pdflow-{switched}", namespace=NAMESPACE)._actor_id == actor_id
    _wait_nothing_held(cluster)


def test_scale_in_under_load_drains_the_victim_and_loses_no_request(e2e_cluster: E2ECluster) -> None:
    cluster = e2e_cluster
    if len(_live_decode(cluster)) < 2:
        _scale_out_decode(cluster)
    before = _live_decode(cluster)
    prefill = len(_live(cluster, "prefill"))
    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(_stream, cluster, k) for k in range(8)]
        _wait_for(  # requests running on every decode worker
            "the requests spread over the decode workers", lambda: all(_busy(cluster, i) for i in before), 60
        )
        with AdminClient(cluster.admin_address) as admin:
            shrink = admin.scale(prefill, len(before) - 1, deadline_s=300)
        results = [s.result(timeout=300) for s in streams]

    assert [r for r in results if r[2] or r[0] != TOKENS or r[1] != "length"] == [], results
    assert len(shrink.victims) == 1 and any("drained" in a for a in shrink.actions), shrink
    assert any("applied" in a for a in shrink.actions), shrink.actions
    (victim,) = shrink.victims
    assert victim not in _live_decode(cluster) and len(_live_decode(cluster)) == len(before) - 1
    with pytest.raises(ValueError):  # its actor is gone
        ray.get_actor(f"pdflow-{victim}", namespace=NAMESPACE)
    _wait_nothing_held(cluster)


def _scale_out_decode(cluster: E2ECluster) -> str:
    """One more decode worker, as ``pdctl scale`` starts it; returns it once the front door sees it."""
    before = _live_decode(cluster)
    prefill = len(_live(cluster, "prefill"))
    with AdminClient(cluster.admin_address) as admin:
        out = admin.scale(prefill, len(before) + 1, deadline_s=120)
    assert out.manual and any("starting decode-" in a for a in out.actions), out
    _wait_for("a new decode worker serving", lambda: len(_live_decode(cluster)) == len(before) + 1, 300)
    (new,) = set(_live_decode(cluster)) - set(before)
    _wait_for(f"the front door seeing {new}", lambda: _front_door_sees(cluster, prefill, len(before) + 1), 30)
    return new


def _front_door_sees(cluster: E2ECluster, prefill: int, decode: int) -> bool:
    health = httpx.get(f"{cluster.http_url}/health", timeout=10).json()
    return bool(health["prefill_workers"] == prefill and health["decode_workers"] == decode)


def _prefilled_on(cluster: E2ECluster, instance: str) -> bool:
    with AdminClient(cluster.admin_address) as admin:
        return any(r.prefill_instance == instance for r in admin.requests(limit=200).requests)


def _wait_for(what: str, cond: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
        time.sleep(0.05)


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
