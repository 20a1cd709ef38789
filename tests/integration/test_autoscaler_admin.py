"""The autoscaler's admin API and ``pdctl`` commands, over real gRPC, against the autoscaler loop of a
``FakeCluster``: what an operator types and sees, and the clear errors for what cannot be done."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from typer.testing import CliRunner

from controller.admin_service import start_admin_server
from controller.autoscaling import AutoscalerLoop
from engine.fake_model import LatencyModel
from pdctl import cli, operations, scaling  # noqa: F401  (registers the commands)
from pdctl.admin_client import AdminClient, AdminUnavailable
from pdctl.options import app
from tests.support.fake_cluster import FakeCluster
from tests.support.fake_scaling import autoscaler

pytestmark = pytest.mark.fakes


class _Backend:
    """The part of the controller the autoscaler RPCs use."""

    def __init__(self, loop: AutoscalerLoop | None) -> None:
        self.autoscaler = loop


async def _serve(loop: AutoscalerLoop | None) -> tuple[Any, str]:
    server, port = await start_admin_server(_Backend(loop), "127.0.0.1", 0)  # type: ignore[arg-type]
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def served() -> AsyncIterator[tuple[FakeCluster, AutoscalerLoop, str]]:
    overrides = {"autoscaler.warm_s": 0, "autoscaler.max_decode": 3}
    async with FakeCluster(prefill=1, decode=2, latency=LatencyModel(), overrides=overrides) as cluster:
        loop, _, _ = autoscaler(cluster)
        server, address = await _serve(loop)
        yield cluster, loop, address
        await server.stop(grace=None)


async def _pdctl(*args: str) -> tuple[int, str]:
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args))
    return result.exit_code, result.output


async def test_without_an_autoscaler_every_call_says_how_to_get_one() -> None:
    server, address = await _serve(None)
    try:
        with (
            AdminClient(address) as client,
            pytest.raises(AdminUnavailable, match=r"FAILED_PRECONDITION.*pdctl up --autoscale"),
        ):
            await asyncio.to_thread(client.autoscaler)
        code, output = await _pdctl("scale", "--prefill", "1", "--decode", "1", "--admin", address)
        assert code == 1 and "pdctl up --autoscale" in output
    finally:
        await server.stop(grace=None)


async def test_status_pause_resume(served: tuple[FakeCluster, AutoscalerLoop, str]) -> None:
    _, loop, address = served
    await loop.tick()
    code, output = await _pdctl("autoscaler", "status", "--admin", address, "--json")
    assert code == 0, output
    status = json.loads(output)
    assert status["actuator"] == "fake" and not status.get("paused")
    pools = {p["role"]: p for p in status["pools"]}
    assert pools["decode"]["ready"] == 2 and pools["prefill"]["ready"] == 1

    code, output = await _pdctl("autoscaler", "pause", "--reason", "maintenance", "--admin", address)
    assert code == 0 and "maintenance" in output and loop.paused == "maintenance"
    assert await loop.tick() is None  # paused: no decision
    code, output = await _pdctl("autoscaler", "resume", "--admin", address)
    assert code == 0 and loop.paused == ""


async def test_scale_sets_a_manual_target_and_explain_shows_what_it_did(
    served: tuple[FakeCluster, AutoscalerLoop, str],
) -> None:
    cluster, loop, address = served
    code, output = await _pdctl("scale", "--prefill", "1", "--decode", "1", "--admin", address)
    assert code == 0, output
    assert "manual -> 1P+1D" in output and "drained" in output
    assert sum(1 for n in cluster.workers if n.startswith("pdflow-decode-")) == 1
    assert loop.paused == "manual target 1P+1D"

    code, output = await _pdctl("autoscaler", "explain", "--admin", address, "--json")
    (decision,) = json.loads(output)["decisions"]
    assert decision["manual"] and decision["victims"] and decision["actions"]

    code, output = await _pdctl("scale", "--prefill", "1", "--decode", "9", "--admin", address)
    assert code == 1 and "INVALID_ARGUMENT" in output and "decode must be within 1..3" in output


async def test_set_role_refuses_what_cannot_switch(served: tuple[FakeCluster, AutoscalerLoop, str]) -> None:
    _, _, address = served
    code, output = await _pdctl("set-role", "decode-0", "router", "--admin", address)
    assert code == 1 and "ROLE must be 'prefill' or 'decode'" in output
    code, output = await _pdctl("set-role", "nope-7", "prefill", "--admin", address)
    assert code == 1 and "INVALID_ARGUMENT" in output and "no instance 'nope-7'" in output
    code, output = await _pdctl("set-role", "prefill-0", "prefill", "--admin", address)
    assert code == 1 and "prefill instance already" in output
    code, output = await _pdctl("autoscaler", "explain", "--limit", "-1", "--admin", address)
    assert code == 1 and "limit must be 0" in output


async def test_the_front_door_exports_the_autoscaler_metrics(
    served: tuple[FakeCluster, AutoscalerLoop, str],
) -> None:
    from dataclasses import replace

    from frontdoor.metrics import FrontDoorMetrics

    cluster, loop, _ = served
    await loop.tick()
    loop.pause("maintenance")
    snapshot = replace(cluster.registry.snapshot(0), autoscaler=loop.totals())
    text = FrontDoorMetrics(lambda: snapshot).exposition()[0].decode()
    assert 'pdflow_autoscaler_ready_replicas{role="decode"} 2.0' in text
    assert 'pdflow_autoscaler_desired_replicas{role="prefill"} 1.0' in text
    assert 'pdflow_autoscaler_pending_replicas{role="decode"} 0.0' in text
    assert 'pdflow_autoscaler_draining_replicas{role="decode"} 0.0' in text
    assert 'pdflow_autoscaler_metric{role="decode"}' in text
    assert re.search(r'pdflow_autoscaler_decisions_total\{reason="\w+"\} [1-9]', text)  # the tick's decision
    assert 'pdflow_autoscaler_decisions_total{reason="scale_in"} 0.0' in text  # every reason, from the start
    assert "pdflow_autoscaler_paused 1.0" in text
