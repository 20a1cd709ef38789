"""A worker that dies mid-request: the request goes on elsewhere (a prefill retried on another prefill
worker, a decode resumed on another decode worker by recomputing prompt and tokens so far) or ends with a
clear error within a deadline, and the controller stops sending the dead worker work. Runs after the other
end-to-end modules: it adds a second decode worker to the shared cluster and kills it."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import ray

from pdctl.admin_client import AdminClient
from pdctl.local_cluster import NAMESPACE
from protocol.messages import SamplingSpec
from protocol.snapshots import Role
from tests.e2e.conftest import E2ECluster

pytestmark = pytest.mark.e2e


def _decode_states(cluster: E2ECluster) -> dict[str, str]:
    with AdminClient(cluster.admin_address) as admin:
        return {i.instance_id: i.state for i in admin.instances("decode").instances}


def _frontdoor_sees_load(cluster: E2ECluster, instance: str) -> bool:
    """Whether the front door's latest snapshot shows a request running or waiting on ``instance``."""
    text = httpx.get(f"{cluster.http_url}/metrics", timeout=10).text
    return any(
        line.startswith(("pdflow_instance_requests_running{", "pdflow_instance_requests_waiting{"))
        and f'instance_id="{instance}"' in line
        and float(line.rsplit(" ", 1)[1]) > 0
        for line in text.splitlines()
    )


def _stream_text(cluster: E2ECluster, body: dict[str, Any], on_event: Any = None) -> tuple[str, list[str]]:
    """Stream a completion: its text and its raw SSE events; ``on_event(n)`` after the n-th event."""
    events: list[str] = []
    text = []
    with httpx.stream("POST", f"{cluster.http_url}/v1/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line)
            if line != "data: [DONE]" and '"error"' not in line:
                text.append(json.loads(line[len("data: ") :])["choices"][0]["text"])
            if on_event is not None:
                on_event(len(events))
    return "".join(text), events


def _grpc_stream(
    cluster: E2ECluster, prompt: str, max_tokens: int, on_response: Any
) -> tuple[list[int], str]:
    """Stream a greedy completion over gRPC: its token ids and finish reason; ``on_response(n, ids)`` after
    the n-th response."""
    import grpc

    from protocol.proto import router_pb2, router_pb2_grpc

    request = router_pb2.GenerateRequest(
        prompt=prompt,
        sampling=router_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )
    ids: list[int] = []
    finish = ""
    with grpc.insecure_channel(cluster.grpc_address) as channel:
        for n, response in enumerate(router_pb2_grpc.RouterStub(channel).Generate(request, timeout=120), 1):
            ids.extend(response.token_ids)
            finish = response.finish_reason or finish
            on_response(n, ids)
    return ids, finish


async def test_decode_worker_death_mid_stream_is_resumed_on_another_with_no_gap_or_repeat(
    e2e_cluster: E2ECluster, model_tokenizer: Any
) -> None:
    """The front door holds the prompt and the tokens sent: decode-0 recomputes them and goes on. The client
    gets every token once: those before the cut, then exactly what the model gives after them (the colocated
    reference engine, prompted with the prompt and the tokens up to the cut). The cut is where the front door
    stood when the worker died: at least the tokens the client had, at most a few more in flight."""
    cluster = e2e_cluster
    name, victim = cluster.cluster.add_worker(Role.DECODE, 1)
    await asyncio.to_thread(ray.get, victim.start.remote(), timeout=300)
    deadline = time.monotonic() + 30
    while httpx.get(f"{cluster.http_url}/health", timeout=10).json()["decode_workers"] != 2:
        assert time.monotonic() < deadline, "the front door never saw decode-1"
        await asyncio.sleep(0.05)
    prompt, budget = "Write a long poem about the moon.", 48
    # Both decode workers are idle: least-loaded dispatch breaks the tie towards decode-1.
    had = 0
    killed = 0.0

    def kill_at_five(n: int, ids: list[int]) -> None:
        nonlocal had, killed
        if n == 5:
            assert ray.get(victim.snapshot.remote(), timeout=10).num_running == 1, "not on decode-1"
            ray.kill(victim)
            had, killed = len(ids), time.monotonic()

    ids, finish = await asyncio.to_thread(_grpc_stream, cluster, prompt, budget, kill_at_five)
    assert killed, "the stream ended before the kill"
    assert finish == "length" and len(ids) == budget  # no token lost, none twice
    assert time.monotonic() - killed < 60
    prompt_ids = model_tokenizer.encode(prompt)
    continuations = []
    for cut in range(had, min(had + 4, budget)):
        left = SamplingSpec(max_tokens=budget - cut, temperature=0.0, ignore_eos=True)
        continuations.append(await cluster.reference_tokens([*prompt_ids, *ids[:cut]], left))
        if continuations[-1] == ids[cut:]:
            break
    else:
        pytest.fail(f"after the cut the tokens are not the model's: got {ids[had:]}, model {continuations}")

    # The controller marks it dead once it stops reporting; new requests then go to decode-0 and succeed.
    deadline = time.monotonic() + 20
    while _decode_states(cluster).get("decode-1") != "DEAD":
        assert time.monotonic() < deadline, f"decode-1 not marked DEAD: {_decode_states(cluster)}"
        await asyncio.sleep(0.1)
    while httpx.get(f"{cluster.http_url}/health", timeout=10).json()["decode_workers"] != 1:
        assert time.monotonic() < deadline, "the front door still routes to decode-1"
        await asyncio.sleep(0.05)
    ok = httpx.post(
        f"{cluster.http_url}/v1/completions",
        json={"model": cluster.model, "prompt": "Hello", "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    assert ok.status_code == 200, ok.text
    cluster.cluster.handle.actors.pop(name, None)
    cluster.wait_idle()


def test_prefill_worker_death_mid_prefill_is_retried_on_another(e2e_cluster: E2ECluster) -> None:
    """The client has received nothing yet: the front door runs the prefill again on prefill-0 and the
    client gets its whole completion (it used to get a 502)."""
    from protocol.ids import RequestId
    from protocol.messages import PrefillRequest, SamplingSpec

    cluster = e2e_cluster
    name, victim = cluster.cluster.add_worker(Role.PREFILL, 1)
    ray.get(victim.start.remote(), timeout=300)
    deadline = time.monotonic() + 30
    while httpx.get(f"{cluster.http_url}/health", timeout=10).json()["prefill_workers"] != 2:
        assert time.monotonic() < deadline, "the front door never saw prefill-1"
        time.sleep(0.05)

    # Keep prefill-0 busy with long prompts sent to it directly, so that dispatch picks prefill-1.
    prefill0 = cluster.worker(Role.PREFILL)
    busy = [
        prefill0.prefill.remote(
            PrefillRequest(
                RequestId(f"busy-{i}"),
                tuple(range(1000 + i, 2900 + i)),
                SamplingSpec(max_tokens=1),
                hand_off=False,
            )
        )
        for i in range(3)
    ]
    deadline = time.monotonic() + 30
    while not _frontdoor_sees_load(cluster, "prefill-0"):
        assert time.monotonic() < deadline, "the front door never saw prefill-0 busy"
        time.sleep(0.05)

    body = {"model": cluster.model, "prompt": list(range(3000, 4900)), "max_tokens": 8, "temperature": 0}
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(httpx.post, f"{cluster.http_url}/v1/completions", json=body, timeout=120)
        deadline = time.monotonic() + 30
        while ray.get(victim.snapshot.remote(), timeout=10).in_flight == 0:
            assert time.monotonic() < deadline, "the request never reached prefill-1"
            assert not future.done(), f"the request finished elsewhere: {future.result().text}"
            time.sleep(0.02)
        ray.kill(victim)
        killed = time.monotonic()
        resp = future.result()
    assert resp.status_code == 200, resp.text
    assert (
        resp.json()["usage"]["completion_tokens"] == 8
        and resp.json()["choices"][0]["finish_reason"] == "length"
    )
    rid = resp.json()["id"].removeprefix("cmpl-")
    deadline = time.monotonic() + 10  # request events reach the controller in batches
    with AdminClient(cluster.admin_address) as admin:
        while (found := admin.requests(request_id=rid, limit=1).requests)[0].prefill_instance != "prefill-0":
            assert time.monotonic() < deadline, f"not recorded as retried on prefill-0: {found}"
            time.sleep(0.1)
    assert time.monotonic() - killed < 60
    ray.get(busy, timeout=120)
    cluster.cluster.handle.actors.pop(name, None)
    cluster.wait_idle()


def test_a_worker_whose_kv_connector_fails_to_start_reports_the_failure(
    e2e_cluster: E2ECluster, model_dir: Any
) -> None:
    """The connector's side channel cannot bind (its configured port is taken): the worker's start fails with
    an error instead of hanging until its deadline (the engine's half-built NIXL agent once swallowed the
    signal that ends vLLM's worker process), and the cluster goes on serving."""
    from decode_worker.actor import DecodeWorker

    config = e2e_cluster.handle.config.model_copy(deep=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config.kv.side_channel_port = taken.getsockname()[1]
        worker = (
            ray.remote(DecodeWorker)
            .options(
                num_cpus=0,
                runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}},
            )
            .remote(
                "doomed-0", "pdflow-doomed", str(model_dir), config.model_dump(mode="json"), "", NAMESPACE
            )
        )
        try:
            with pytest.raises(ray.exceptions.RayTaskError, match="Engine core initialization failed"):
                ray.get(worker.start.remote(), timeout=config.worker.start_timeout_s)
        finally:
            ray.kill(worker)
    ok = httpx.post(
        f"{e2e_cluster.http_url}/v1/completions",
        json={"model": e2e_cluster.model, "prompt": "Hello", "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    assert ok.status_code == 200, ok.text
