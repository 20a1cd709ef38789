"""Live migration on real engines: a greedy request moved once, and three times, between two decode workers
gives exactly the tokens of an unmigrated run with no gap or duplicate in the client's stream; ``pdctl drain``
empties a worker without failing a request. A second decode worker (decode-2) joins the shared cluster for
this module only."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
import ray

from kv_transfer.transport.side_channel import SideChannelClient
from pdctl.admin_client import AdminClient
from protocol.auth import Credentials
from protocol.ids import RequestId
from protocol.kv_handle import KVHandle, KVPart
from protocol.kv_ops import Abort
from protocol.messages import DecodeRequest, FinishReason, SamplingSpec
from protocol.proto import router_pb2, router_pb2_grpc
from protocol.snapshots import Role
from tests.e2e.conftest import E2ECluster

pytestmark = pytest.mark.e2e

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."
# about 330 tokens: with 128-token blocks the migration pre-copies two full blocks, then hands over while the
# last (partial) block travels
LONG_PROMPT = (
    "Here are a lighthouse keeper's log entries for one week.\n"
    + "".join(
        f"Day {d}: the lamp was lit at {17 + d % 3} o'clock, the wind blew from the {side}, "
        f"{ships} ships passed, and the keeper repaired the {part}.\n"
        for d, side, ships, part in [
            (1, "north", 3, "stairs"),
            (2, "east", 5, "lens"),
            (3, "south", 2, "door"),
            (4, "west", 7, "foghorn"),
            (5, "north-east", 4, "railing"),
            (6, "south-west", 6, "window"),
            (7, "north", 1, "roof"),
        ]
    )
    + "Write a detailed story of that week from the keeper's point of view, day by day."
)
MAX_TOKENS = 96


def _decode_workers_seen(cluster: E2ECluster) -> int:
    return int(httpx.get(f"{cluster.http_url}/health", timeout=10).json()["decode_workers"])


def _wait(what: str, check: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


@pytest.fixture(scope="module")
def two_decoders(e2e_cluster: E2ECluster) -> Iterator[E2ECluster]:
    cluster = e2e_cluster
    name, second = cluster.cluster.add_worker(Role.DECODE, 2)
    ray.get(second.start.remote(), timeout=300)
    try:
        _wait("the front door to see decode-2", lambda: _decode_workers_seen(cluster) == 2)
        yield cluster
    finally:
        ray.get(second.shutdown.remote(), timeout=60)
        ray.kill(second)
        cluster.handle.actors.pop(name, None)
        _wait("the front door to drop decode-2", lambda: _decode_workers_seen(cluster) == 1)


def _moved_to(admin: AdminClient, request_id: str) -> str:
    """The decode worker a request runs (or ran) on, once a hand-over is done ("" during one)."""
    found = admin.requests(request_id=request_id).requests
    return found[0].decode_instance if found and found[0].state != "MIGRATING" else ""


def _decoding_on(admin: AdminClient, request_id: str) -> str:
    found = admin.requests(request_id=request_id).requests
    return found[0].decode_instance if found and found[0].state == "DECODING" else ""


async def _generate_with_moves(
    cluster: E2ECluster, request_id: str, prompt_ids: tuple[int, ...], moves: list[int]
) -> tuple[list[int], list[Any]]:
    """Stream one greedy request over gRPC; after ``moves[k]`` tokens, migrate it to the other decode worker.
    Returns the client's tokens (as streamed, in order) and the migration reports."""
    request = router_pb2.GenerateRequest(
        model=cluster.model,
        request_id=request_id,
        prompt_token_ids=router_pb2.TokenIds(ids=list(prompt_ids)),
        sampling=router_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
    )
    tokens: list[int] = []
    reports: list[Any] = []
    pending = list(moves)
    migrating: asyncio.Task[Any] | None = None
    with AdminClient(cluster.admin_address) as admin:

        def move() -> Any:
            source = _wait("the request to be decoding", lambda: _decoding_on(admin, request_id))
            target = "decode-2" if source == "decode-0" else "decode-0"
            info = admin.migrate(request_id, target)
            if info.outcome == "moved":  # otherwise the caller's check on the outcomes shows why
                _wait(f"the request to run on {target}", lambda: _moved_to(admin, request_id) == target)
            return info

        async with grpc.aio.insecure_channel(cluster.grpc_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            async for resp in stub.Generate(request, timeout=300):
                tokens.extend(resp.token_ids)
                if migrating is None and pending and len(tokens) >= pending[0]:
                    pending.pop(0)
                    migrating = asyncio.create_task(asyncio.to_thread(move))
                if migrating is not None and migrating.done():
                    reports.append(migrating.result())
                    migrating = None
        if migrating is not None:
            reports.append(await migrating)
    return tokens, reports


async def _continue_on(
    destination: Any,
    rid: RequestId,
    prompt_ids: tuple[int, ...],
    reference: list[int],
    cut: int,
    handle: KVHandle,
) -> tuple[list[int], FinishReason | None]:
    """Hand ``destination`` the request as a migration would once the client had ``cut`` tokens of
    ``reference`` (greedy, ``len(reference)`` tokens in all); returns the tokens it streams and its finish."""
    continuation = DecodeRequest(
        rid,
        (*prompt_ids, *reference[: cut - 1]),
        reference[cut - 1],
        SamplingSpec(max_tokens=len(reference) - cut + 1, temperature=0.0, ignore_eos=True),
        handle,
    )
    tokens: list[int] = []
    finish = None
    async for ref in destination.decode.options(num_returns="streaming").remote(continuation):
        chunk = await ref
        tokens.extend(chunk.token_ids)
        finish = chunk.finish_reason or finish
    return tokens, finish


@pytest.mark.parametrize(
    ("prompt", "moves"),
    [(PROMPT, [16]), (PROMPT, [10, 40, 70]), (LONG_PROMPT, [16])],
    ids=["once", "three-times", "pre-copied"],
)
async def test_migrated_request_gives_the_unmigrated_tokens(
    two_decoders: E2ECluster, model_tokenizer: Any, prompt: str, moves: list[int]
) -> None:
    cluster = two_decoders
    prompt_ids = tuple(model_tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
    if prompt == LONG_PROMPT:
        assert 256 < len(prompt_ids) < 384, len(prompt_ids)
    sampling = SamplingSpec(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    reference = await cluster.reference_tokens(prompt_ids, sampling)
    request_id = f"mig-{len(moves)}-{time.monotonic_ns()}"
    tokens, reports = await _generate_with_moves(cluster, request_id, prompt_ids, moves)
    assert [r.outcome for r in reports] == ["moved"] * len(moves), [r.error for r in reports]
    assert all(r.error == "" for r in reports), [r.error for r in reports]
    if prompt == LONG_PROMPT:
        assert [r.stages for r in reports] == [2], "a pre-copy stage, then the last push"
        # the destination primed its prefix cache with the pre-copied blocks: the continuation's KV is
        # those cached blocks plus the last push, and its tokens must still be exact
        assert [r.primed_blocks for r in reports] == [2]
    assert all(r.tokens >= len(prompt_ids) and r.wire_bytes > 0 for r in reports)
    assert len(tokens) == MAX_TOKENS, "the client's stream lost or repeated tokens"
    assert tokens == reference
    with AdminClient(cluster.admin_address) as admin:
        record = _wait(
            "the request's final record",
            lambda: next(
                (r for r in admin.requests(request_id=request_id).requests if r.state == "FINISHED_LENGTH"),
                None,
            ),
        )
    states = [e.state for e in record.events]
    assert states.count("MIGRATING") == len(moves), states
    assert record.output_tokens == MAX_TOKENS
    await asyncio.to_thread(cluster.wait_idle)


async def test_a_migration_whose_kv_is_lost_on_the_destination_is_recomputed_there(
    two_decoders: E2ECluster, model_tokenizer: Any
) -> None:
    """The destination lost the parts that landed (a lease ran out, its staging was dropped) before the
    hand-over reached it: it recomputes the request instead of failing it, and the stream goes on."""
    cluster = two_decoders
    prompt_ids = tuple(model_tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]))
    budget = 40
    reference = await cluster.reference_tokens(
        prompt_ids, SamplingSpec(max_tokens=budget, temperature=0.0, ignore_eos=True)
    )
    cut = 12  # the client has had 12 tokens when the request moves
    rid = RequestId(f"lost-kv-{time.monotonic_ns()}")
    lost = (KVPart(f"{rid}/gone/0", 0), KVPart(f"{rid}/gone/1", 4))
    destination = cluster.handle.workers(Role.DECODE)["pdflow-decode-2"]
    handle = KVHandle(lost, migrated=True)
    tokens, finish = await _continue_on(destination, rid, prompt_ids, reference, cut, handle)
    assert finish is FinishReason.LENGTH and tokens == reference[cut:]
    await asyncio.to_thread(cluster.wait_idle)


async def test_a_migration_whose_last_stage_never_lands_is_recomputed_on_the_destination(
    two_decoders: E2ECluster, model_tokenizer: Any
) -> None:
    """The hand-over reached the destination while the last push was on its way, and that push failed (the
    source dropped it): the destination stops waiting for it at once and recomputes the request."""
    cluster = two_decoders
    prompt_ids = tuple(model_tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}]))
    budget = 40
    reference = await cluster.reference_tokens(
        prompt_ids, SamplingSpec(max_tokens=budget, temperature=0.0, ignore_eos=True)
    )
    cut = 12
    rid = RequestId(f"dropped-last-{time.monotonic_ns()}")
    last = f"{rid}/m/0"
    destination = cluster.handle.workers(Role.DECODE)["pdflow-decode-2"]
    address = (await destination.snapshot.remote()).kv_endpoint
    client = SideChannelClient(address, Credentials.from_env().cluster_secret)  # signed, as a worker's
    try:  # what the source sends when its last push fails after the hand-over
        client.ask(Abort(last, "the source failed"), timeout_s=10)
    finally:
        client.close()
    handle = KVHandle((KVPart(last, 0),), "any", frozenset({last}), migrated=True)
    started = time.monotonic()
    tokens, finish = await _continue_on(destination, rid, prompt_ids, reference, cut, handle)
    assert finish is FinishReason.LENGTH and tokens == reference[cut:]
    assert time.monotonic() - started < 25, "it waited for the load deadline (30 s) instead"
    await asyncio.to_thread(cluster.wait_idle)


def test_pdctl_drain_empties_a_worker_without_failing_requests(two_decoders: E2ECluster) -> None:
    cluster = two_decoders
    with AdminClient(cluster.admin_address) as admin:
        admin.cordon("decode-2")  # steer the requests onto decode-0
    _wait("the front door to stop routing to decode-2", lambda: _decode_workers_seen(cluster) == 1)
    # long enough to be still running once pdctl has started (a cold start on a fresh clone takes seconds)
    body = {"model": cluster.model, "prompt": PROMPT, "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    results: list[Any] = []

    def one() -> None:
        results.append(httpx.post(f"{cluster.http_url}/v1/completions", json=body, timeout=300))

    clients = [threading.Thread(target=one) for _ in range(3)]
    for c in clients:
        c.start()
    decode0 = cluster.handle.workers(Role.DECODE)["pdflow-decode-0"]
    _wait("three requests running on decode-0", lambda: len(ray.get(decode0.running_requests.remote())) == 3)
    with AdminClient(cluster.admin_address) as admin:
        admin.uncordon("decode-2")
    cli = [sys.executable, "-c", "from pdctl.cli import main; main()"]
    try:
        drained = subprocess.run(
            [*cli, "drain", "decode-0", "--admin", cluster.admin_address],
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        with AdminClient(cluster.admin_address) as admin:
            admin.uncordon("decode-0")
    for c in clients:
        c.join(timeout=300)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert "3 moved" in drained.stdout and "it is empty" in drained.stdout, drained.stdout
    assert [r.status_code for r in results] == [200] * 3, [r.text for r in results]
    assert all(r.json()["usage"]["completion_tokens"] == 300 for r in results)
    cluster.wait_idle()

    def drained_metric() -> float:
        text = httpx.get(f"{cluster.http_url}/metrics", timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("pdflow_migrations_total{")
            and 'trigger="drain"' in line
            and 'outcome="moved"' in line
        )

    _wait("the drain in the front door's metrics", lambda: drained_metric() >= 3)
