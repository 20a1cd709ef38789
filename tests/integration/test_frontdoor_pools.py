"""The front door's real request router with no live worker of a role: HTTP 503 and gRPC UNAVAILABLE, with a
message naming the empty pool. No Ray is needed: dispatch fails before any worker is called."""

from __future__ import annotations

import time
from typing import Any

import grpc
import httpx
import pytest

from frontdoor.actor import FrontDoor
from frontdoor.grpc_api import start_grpc_server
from frontdoor.http_api import build_http_app
from frontdoor.textgen import TextGenerator
from frontdoor.tokenizer import ModelTokenizer
from protocol.config import ClusterConfig
from protocol.ids import InstanceId
from protocol.proto import router_pb2, router_pb2_grpc
from protocol.snapshots import ClusterSnapshot, InstanceSnapshot, InstanceState, Role


def _instance(iid: str, role: Role, state: InstanceState = InstanceState.READY) -> InstanceSnapshot:
    return InstanceSnapshot(InstanceId(iid), role, state, f"pdflow-{iid}", kv_blocks_total=10)


@pytest.fixture
def frontdoor(model_dir: Any, model_tokenizer: ModelTokenizer) -> tuple[FrontDoor, TextGenerator]:
    door = FrontDoor(ClusterConfig().model_dump(mode="json"), str(model_dir), "pdflow", "none", "fd")
    textgen = TextGenerator(
        door.router,
        model_tokenizer,
        model_name=door.config.model.name,
        max_model_len=door.config.engine.max_model_len,
        default_max_tokens=16,
    )
    return door, textgen


@pytest.mark.parametrize(
    ("instances", "pool"),
    [
        ((_instance("prefill-0", Role.PREFILL),), "decode"),
        (
            (_instance("decode-0", Role.DECODE), _instance("prefill-0", Role.PREFILL, InstanceState.DEAD)),
            "prefill",
        ),
    ],
)
async def test_an_empty_pool_is_a_503_naming_it(
    frontdoor: tuple[FrontDoor, TextGenerator], instances: tuple[InstanceSnapshot, ...], pool: str
) -> None:
    door, textgen = frontdoor
    door.update_snapshot(ClusterSnapshot(version=1, instances=instances, taken_at=time.time()))
    app = build_http_app(
        textgen, model_name=door.config.model.name, metrics_text=door.metrics.exposition, health=door.health
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fd") as client:
        for stream in (False, True):
            resp = await client.post(
                "/v1/completions",
                json={"model": door.config.model.name, "prompt": "Hello", "max_tokens": 4, "stream": stream},
            )
            assert resp.status_code == 503
            assert f"the {pool} pool is empty" in resp.json()["error"]["message"]
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["ok"] is False
        assert health.json()["reason"] == f"the {pool} pool is empty"
        metrics = (await client.get("/metrics")).text
        assert 'pdflow_requests_total{outcome="rejected"} 2.0' in metrics

    server, port = await start_grpc_server(textgen, "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.Generate(
                    router_pb2.GenerateRequest(
                        prompt="Hello", sampling=router_pb2.SamplingParams(max_tokens=4)
                    ),
                    timeout=10,
                ):
                    pass
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert f"the {pool} pool is empty" in (info.value.details() or "")
    finally:
        await server.stop(grace=None)


def test_health_needs_both_pools_and_a_fresh_snapshot(frontdoor: tuple[FrontDoor, TextGenerator]) -> None:
    door, _ = frontdoor
    both = (_instance("prefill-0", Role.PREFILL), _instance("decode-0", Role.DECODE))
    door.update_snapshot(ClusterSnapshot(version=1, instances=both, taken_at=time.time()))
    assert door.health()["ok"] is True
    stale_at = time.time() - door.config.controller.heartbeat_timeout_s - 1
    door.update_snapshot(ClusterSnapshot(version=2, instances=both, taken_at=stale_at))
    health = door.health()
    assert health["ok"] is False and health["reason"] == "no recent cluster snapshot from the controller"
