"""The Helm chart's preStop hook, ``pdctl pod drain``, over real gRPC against the controller's drain
(``controller.draining``) on a ``FakeCluster``: streams on the pod's worker move away and finish whole, the
hook's exit status says whether the pod may stop, and a pod that never registered stops at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from typer.testing import CliRunner

from controller.admin_service import start_admin_server
from controller.draining import drain_instance
from controller.migrations import DrainResult
from engine.fake_model import LatencyModel
from pdctl import cli, pod  # noqa: F401  (registers the commands)
from pdctl.options import app
from protocol.errors import InvalidRequest
from protocol.snapshots import ClusterSnapshot, InstanceState, Role
from tests.integration.test_request_path import colocated
from tests.support.fake_cluster import FakeCluster
from tests.support.fake_scaling import FakeFrontDoors

pytestmark = pytest.mark.fakes
SLOW = LatencyModel(decode=((1, 0.004), (32, 0.008)))  # streams long enough to be running when drained


class _Backend:
    """The controller's side of ListInstances and Drain, on the fake cluster (as ``Controller.drain``)."""

    autoscaler = None

    def __init__(self, cluster: FakeCluster, doors: FakeFrontDoors) -> None:
        self.cluster, self.doors = cluster, doors

    def cluster_snapshot(self) -> ClusterSnapshot:
        return self.cluster.registry.snapshot(self.cluster.wall_clock())

    def seconds_since_report(self, instance_id: str) -> float:
        return self.cluster.registry.seconds_since_report(instance_id, self.cluster.clock())

    async def drain(self, instance_id: str, timeout_s: float) -> DrainResult:
        inst = self.cluster_snapshot().by_id(instance_id)
        if inst is None:
            raise InvalidRequest(f"no instance {instance_id!r}", param="instance_id")
        return await drain_instance(
            instance_id,
            inst.role,
            registry=self.cluster.registry,
            migrations=self.cluster.coordinator,
            frontdoors=self.doors,
            timeout_s=timeout_s,
            clock=self.cluster.clock,
        )


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakeCluster, FakeFrontDoors, str]]:
    async with FakeCluster(prefill=1, decode=2, latency=SLOW) as cluster:
        doors = FakeFrontDoors(cluster)
        server, port = await start_admin_server(_Backend(cluster, doors), "127.0.0.1", 0)  # type: ignore[arg-type]
        yield cluster, doors, f"127.0.0.1:{port}"
        await server.stop(grace=None)


async def _hook(address: str, instance: str, *extra: str) -> tuple[int, str]:
    """The hook as the kubelet runs it: POD_NAME and PDFLOW_ADMIN from the pod's environment."""
    env = {"POD_NAME": instance, "PDFLOW_ADMIN": address}
    result = await asyncio.to_thread(CliRunner().invoke, app, ["pod", "drain", *extra], env=env)
    return result.exit_code, result.output


async def test_the_prestop_hook_moves_the_streams_away_and_the_pod_may_stop(
    served: tuple[FakeCluster, FakeFrontDoors, str],
) -> None:
    cluster, _, address = served
    cluster.coordinator.cordon("decode-1")  # both streams start on decode-0
    await cluster.wait_for(
        "decode-1 out of dispatch", lambda: len(cluster.router.snapshot.live(Role.DECODE)) == 1
    )
    prompts = [tuple(range(i, i + 40)) for i in (7, 900)]
    clients = [
        asyncio.create_task(cluster.generate(p, 150, request_id=f"pod-{i}")) for i, p in enumerate(prompts)
    ]
    await cluster.wait_for(
        "both running on decode-0", lambda: len(cluster.worker("decode-0").running_requests()) == 2
    )
    await cluster.wait_for(
        "both reported",
        lambda: len(cluster.registry.snapshot(0).by_id("decode-0").requests) == 2,  # type: ignore[union-attr]
    )
    cluster.coordinator.uncordon("decode-1")

    code, said = await _hook(address, "decode-0")

    assert code == 0, said
    assert "decode-0: 2 moved" in said and "empty" in said
    for (tokens, finish), prompt in zip(await asyncio.gather(*clients), prompts, strict=True):
        assert tokens == colocated(prompt, 150) and finish == "length"  # whole, nothing lost or repeated
    assert cluster.registry.snapshot(0).by_id("decode-0").state is InstanceState.CORDONED  # type: ignore[union-attr]


async def test_a_pod_whose_worker_never_registered_stops_at_once(
    served: tuple[FakeCluster, FakeFrontDoors, str],
) -> None:
    _, _, address = served
    code, said = await _hook(address, "pdflow-decode-7c9f")
    assert code == 0 and "not registered, nothing to drain" in said


async def test_a_drain_that_cannot_finish_exits_1_for_the_kubelets_event(
    served: tuple[FakeCluster, FakeFrontDoors, str],
) -> None:
    _, doors, address = served
    doors.stuck = True  # a front door that always has a request on its way to the worker
    code, said = await _hook(address, "prefill-0", "--timeout", "0.5")
    assert code == 1 and "1 still there after 0.5s" in " ".join(said.split())


async def test_without_an_admin_address_the_hook_says_what_to_set() -> None:
    result = await asyncio.to_thread(
        CliRunner().invoke, app, ["pod", "drain"], env={"POD_NAME": "decode-0", "PDFLOW_ADMIN": ""}
    )
    assert result.exit_code == 1 and "PDFLOW_ADMIN" in result.output
