"""The controller or the front door dies: the supervisor ``pdctl up`` runs (``LocalCluster.supervise``)
starts it again under its name and on its addresses; the workers report to the new controller by themselves,
the front door subscribes to it again, and streams that were running go on."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray

from pdctl.admin_client import AdminClient
from pdctl.local_cluster import CONTROLLER_NAME, FRONTDOOR_NAME, frontdoor_name
from protocol.snapshots import Role
from tests.e2e.conftest import E2ECluster, stream_completion

pytestmark = pytest.mark.e2e


def _wait_healthy(cluster: E2ECluster, deadline_s: float) -> float:
    """Seconds until the front door's /health says ok (it needs a fresh snapshot from the controller)."""
    start = time.monotonic()
    while True:
        try:
            if httpx.get(f"{cluster.http_url}/health", timeout=5).json()["ok"]:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass  # a front door not listening yet
        assert time.monotonic() - start < deadline_s, "the front door never became healthy"
        time.sleep(0.1)


def _supervise_until_restarted(cluster: E2ECluster, name: str) -> None:
    """What ``pdctl up`` does every second, until it restarts ``name`` (Ray kills an actor asynchronously:
    it may answer a ping just after ``ray.kill``)."""
    deadline = time.monotonic() + 30
    while (restarted := cluster.cluster.supervise()) != [name]:
        assert restarted == [], f"restarted {restarted}"
        assert time.monotonic() < deadline, f"{name} was not restarted"
        time.sleep(0.2)


def test_a_killed_controller_is_restarted_and_streams_in_flight_finish(cluster: E2ECluster) -> None:
    with ThreadPoolExecutor(2) as pool:
        streams = [pool.submit(stream_completion, cluster, "Tell me about the sea.", 32) for _ in range(2)]
        deadline = time.monotonic() + 60
        while not any(cluster.snapshot(role).num_running for role in (Role.PREFILL, Role.DECODE)):
            assert time.monotonic() < deadline, "the streams never started"
            time.sleep(0.05)
        ray.kill(cluster.handle.actors[CONTROLLER_NAME], no_restart=True)
        _supervise_until_restarted(cluster, CONTROLLER_NAME)
        for stream in streams:
            assert stream.result(timeout=120) == (32, "length", "")
    # the new controller serves the same admin address and knows the workers from their reports
    took = _wait_healthy(cluster, 15)
    with AdminClient(cluster.admin_address) as admin:
        states = {i.instance_id: i.state for i in admin.instances().instances}
    assert states == {"prefill-0": "READY", "decode-0": "READY"}, states
    assert stream_completion(cluster, "Hello", 4) == (4, "length", ""), f"healthy after {took:.1f}s"
    assert cluster.cluster.supervise() == []  # nothing else to restart


def test_a_killed_front_door_is_restarted_on_its_addresses(cluster: E2ECluster) -> None:
    ray.kill(cluster.handle.actors[FRONTDOOR_NAME], no_restart=True)
    _supervise_until_restarted(cluster, FRONTDOOR_NAME)
    _wait_healthy(cluster, 30)
    assert stream_completion(cluster, "Hello", 4) == (4, "length", "")


def _complete(url: str, cluster: E2ECluster) -> int:
    body = {"model": cluster.model, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code


def test_two_front_doors_serve_at_once_and_one_goes_on_while_the_other_is_down(cluster: E2ECluster) -> None:
    second = cluster.cluster.add_frontdoor()
    try:
        assert _complete(cluster.http_url, cluster) == _complete(second["http"], cluster) == 200
        ray.kill(cluster.handle.actors[FRONTDOOR_NAME], no_restart=True)
        assert _complete(second["http"], cluster) == 200
        _supervise_until_restarted(cluster, FRONTDOOR_NAME)
        _wait_healthy(cluster, 30)
        assert _complete(cluster.http_url, cluster) == 200
    finally:  # back to one front door for the tests after this one
        name = frontdoor_name(1)
        if (second_actor := cluster.handle.actors.pop(name, None)) is not None:
            ray.kill(second_actor, no_restart=True)
        cluster.handle.frontdoors.pop(name, None)
        cluster.cluster.config.frontdoor.replicas = 1
