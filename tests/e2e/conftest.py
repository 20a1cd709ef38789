"""One real cluster per test session: a local Ray cluster with 1 prefill + 1 decode vLLM CPU engine
(SmolLM2-135M), NIXL between them, the controller and a front door on free loopback ports; plus one
unregistered colocated engine as the reference. Every scenario ends with a leak check."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from pdctl.local_cluster import FRONTDOOR_NAME, REFERENCE_NAME, ClusterHandle, LocalCluster
from protocol.config import ClusterConfig
from protocol.messages import SamplingSpec
from protocol.snapshots import InstanceSnapshot, Role

_LAST = "test_dashboards_live"  # reshapes the pools and reads what every scenario before it left


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(
        key=lambda item: item.nodeid.split("::")[0].endswith(f"{_LAST}.py")
    )  # stable: others keep order


class E2ECluster:
    def __init__(self, cluster: LocalCluster, handle: ClusterHandle, reference: Any) -> None:
        self.cluster = cluster
        self.handle = handle
        self.reference = reference
        self.http_url = handle.http_url
        self.grpc_address = handle.grpc_address
        self.admin_address = handle.admin_address
        self.model = handle.config.model.name
        self._reference_ids = itertools.count()

    def worker(self, role: Role) -> Any:
        return next(iter(self.handle.workers(role).values()))

    def snapshot(self, role: Role) -> InstanceSnapshot:
        import ray

        return ray.get(self.worker(role).snapshot.remote(), timeout=10)

    def leaks(self) -> dict[str, dict[str, int]]:
        """What anything still holds, by holder, zero figures left out: every worker's leak check (KV blocks,
        requests, staging regions, landed and reserved transfers, early-decoded layers, pulls, pushes, loads
        waiting, streams, migrations; the reference engine's too) and the controller's migrations in
        flight, and the front door's requests in flight."""
        import ray

        from pdctl.admin_client import AdminClient

        actors = {
            **{
                name: a
                for role in (Role.PREFILL, Role.DECODE)
                for name, a in self.handle.workers(role).items()
            },
            REFERENCE_NAME: self.reference,
        }
        figures = {name: ray.get(actor.leak_check.remote(), timeout=30) for name, actor in actors.items()}
        with AdminClient(self.admin_address) as admin:
            figures["controller"] = {"migrations_in_flight": len(admin.migrations(0).in_flight)}
        in_flight = self.handle.actors[FRONTDOOR_NAME].requests_in_flight.remote()
        figures["frontdoor"] = {"requests_in_flight": ray.get(in_flight, timeout=30)}
        return {name: held for name, of in figures.items() if (held := {k: v for k, v in of.items() if v})}

    def wait_idle(self, timeout_s: float = 30.0) -> dict[str, InstanceSnapshot]:
        """Leak check: wait until nothing holds anything (``leaks``); return the first worker's snapshot per
        role, or raise with what is still held."""
        deadline = time.monotonic() + timeout_s
        while held := self.leaks():
            if time.monotonic() > deadline:
                raise AssertionError(f"still held after {timeout_s}s: {held}")
            time.sleep(0.1)
        return {role.value: self.snapshot(role) for role in (Role.PREFILL, Role.DECODE)}

    async def reference_tokens(self, prompt_ids: Sequence[int], sampling: SamplingSpec) -> list[int]:
        """The colocated reference engine's tokens for ``prompt_ids``, run on their own."""
        ids: list[int] = []
        request_id = f"ref-{next(self._reference_ids)}"
        async for ref in self.reference.generate.options(num_returns="streaming").remote(
            request_id, tuple(prompt_ids), sampling
        ):
            ids.extend((await ref).token_ids)
        return ids


@pytest.fixture(scope="session")
def e2e_cluster(model_dir: Any) -> Iterator[E2ECluster]:
    config = ClusterConfig.load(
        overrides={
            "frontdoor.http_port": 0,
            "frontdoor.grpc_port": 0,
            "controller.admin_port": 0,
            "frontdoor.token_timeout_s": 30,
            # every full block is pre-copied, so that a migration of a few hundred tokens runs a pre-copy
            # stage before its last push (the default waits for more than 4 blocks)
            "migration.final_blocks": 0,
        }
    )
    cluster = LocalCluster(config, model_dir)
    cluster.start()
    try:
        reference = cluster.add_reference()
        cluster.wait_until_serving()
        yield E2ECluster(cluster, cluster.handle, reference)
    finally:
        cluster.stop()


@pytest.fixture
def cluster(e2e_cluster: E2ECluster) -> Iterator[E2ECluster]:
    """The shared cluster, with the full leak check after the test (``E2ECluster.leaks``)."""
    yield e2e_cluster
    e2e_cluster.wait_idle()


def stream_completion(cluster: E2ECluster, prompt: str, max_tokens: int) -> tuple[int, str, str]:
    """One streamed completion through the HTTP API, every token forced (``ignore_eos``): (tokens, finish
    reason, error); the error is empty when the stream ended well."""
    import httpx

    body = {
        "model": cluster.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
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
