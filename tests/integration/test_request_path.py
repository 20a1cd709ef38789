"""The path every request takes, below end to end: the front door's real request router, dispatch, the
prefill and decode workers' real code with their KV hand-off over the real KV exchange, aborts,
cancellation and worker death. On fake engines over an in-process fabric: no Ray, no vLLM (``FakeCluster``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from engine.fake_engine import FakeEngine
from engine.fake_model import LatencyModel, next_token
from protocol.errors import Overloaded, PoolEmpty, WorkerFailed
from protocol.ids import RequestId
from protocol.lifecycle import RequestState
from protocol.messages import FinishReason, TokenChunk
from protocol.snapshots import Role
from tests.support.fake_cluster import FakeCluster

pytestmark = pytest.mark.fakes

PROMPT = tuple(range(100, 150))  # 50 tokens: 13 KV blocks of 4


def colocated(prompt: tuple[int, ...], n: int) -> list[int]:
    """The tokens one engine gives ``prompt`` on its own."""
    sequence, out = list(prompt), []
    for _ in range(n):
        out.append(next_token(sequence))
        sequence.append(out[-1])
    return out


async def test_a_request_streams_the_colocated_tokens_through_a_kv_hand_off_and_frees_everything() -> None:
    async with FakeCluster(decode=1) as cluster:
        tokens, finish = await cluster.generate(PROMPT, 20, request_id="one")
        assert tokens == colocated(PROMPT, 20) and finish == "length"
        assert cluster.states("one") == [
            RequestState.QUEUED,
            RequestState.PREFILLING,
            RequestState.TRANSFERRING,
            RequestState.DECODING,
            RequestState.FINISHED_LENGTH,
        ]
        record = cluster.requests.get("one")
        assert record is not None and record.transfer is not None
        assert record.transfer.outcome.value == "success" and record.transfer.tokens == len(PROMPT)
        await cluster.wait_idle()


async def test_a_request_that_ends_at_its_first_token_frees_the_kv_pushed_for_it() -> None:
    async with FakeCluster(decode=1) as cluster:
        first = colocated(PROMPT, 1)[0]
        tokens, finish = await cluster.generate(PROMPT, 16, request_id="stop", stop_token_ids=(first,))
        assert (tokens, finish) == ([first], "stop")
        await cluster.wait_idle()  # the decode worker released the landed hand-off it will never decode


async def test_least_loaded_dispatch_spreads_concurrent_requests_over_the_decode_pool() -> None:
    async with FakeCluster(decode=2) as cluster:
        prompts = [tuple(range(i, i + 30)) for i in range(6)]
        results = await asyncio.gather(
            *(cluster.generate(p, 30, request_id=f"spread-{i}") for i, p in enumerate(prompts))
        )
        assert [tokens for tokens, _ in results] == [colocated(p, 30) for p in prompts]
        placed = {cluster.requests.get(f"spread-{i}").decode_instance for i in range(6)}  # type: ignore[union-attr]
        assert placed == {"decode-0", "decode-1"}
        await cluster.wait_idle()


async def test_an_empty_pool_is_refused_with_a_clear_error() -> None:
    async with FakeCluster(decode=0) as cluster:
        with pytest.raises(PoolEmpty, match="decode pool is empty"):
            await cluster.generate(PROMPT, 4)


def stalled(engine: FakeEngine) -> asyncio.Event:
    """Hold every step of ``engine`` (prefill or decode) until the returned event is set."""
    release, original = asyncio.Event(), engine._sleep

    async def held(seconds: float) -> None:
        await release.wait()
        await original(seconds)

    engine._sleep = held  # type: ignore[method-assign]
    return release


@pytest.mark.parametrize("stage", [RequestState.PREFILLING, RequestState.TRANSFERRING, RequestState.DECODING])
async def test_an_abort_at_each_stage_ends_the_stream_and_frees_both_workers(stage: RequestState) -> None:
    """Aborted while prefilling, between the first token and the decode worker's first (the KV landed, not
    loaded), or while decoding: the stream ends with "abort", and neither worker holds anything after."""
    async with FakeCluster(decode=1) as cluster:
        held = {
            RequestState.PREFILLING: "pdflow-prefill-0",
            RequestState.TRANSFERRING: "pdflow-decode-0",
        }.get(stage)
        release = stalled(cluster.engines[held]) if held else asyncio.Event()
        chunks: list[TokenChunk] = []
        async with contextlib.aclosing(cluster.stream(PROMPT, 200, request_id="abort")) as stream:
            reading = asyncio.ensure_future(_read(stream, chunks))
            await cluster.wait_for(f"the request in {stage}", lambda: cluster.states("abort")[-1:] == [stage])
            if stage is RequestState.DECODING:
                await cluster.wait_for("five tokens", lambda: len(chunks) >= 5)
            assert await cluster.router.abort(RequestId("abort"))
            await reading
            release.set()
        assert chunks[-1].finish_reason is FinishReason.ABORT
        assert cluster.states("abort")[-2:] == [stage, RequestState.FINISHED_ABORTED]
        await cluster.wait_idle()


async def _read(stream: AsyncIterator[TokenChunk], chunks: list[TokenChunk]) -> None:
    async for chunk in stream:
        chunks.append(chunk)


async def test_a_client_that_stops_reading_mid_stream_frees_both_workers() -> None:
    async with FakeCluster(decode=1) as cluster:
        async with contextlib.aclosing(cluster.stream(PROMPT, 500, request_id="gone")) as stream:
            seen = 0
            async for chunk in stream:
                seen += len(chunk.token_ids)
                if seen >= 10:
                    break  # the client goes away; closing the stream aborts the request
        assert cluster.states("gone")[-1] is RequestState.FINISHED_ABORTED
        await cluster.wait_idle()


async def test_a_decode_worker_that_dies_mid_stream_with_no_other_gives_the_client_a_clear_error() -> None:
    async with FakeCluster(decode=1) as cluster:
        tokens = []
        with pytest.raises(WorkerFailed, match="decode worker decode-0 failed"):
            async for chunk in cluster.stream(PROMPT, 500, request_id="dies"):
                tokens.extend(chunk.token_ids)
                if len(tokens) == 5:
                    cluster.client.fail("pdflow-decode-0")
        assert tokens == colocated(PROMPT, len(tokens))  # what it got before is right
        assert cluster.states("dies")[-1] is RequestState.FINISHED_ERROR


@pytest.mark.parametrize("after", [0, 5], ids=["during the hand-off", "mid-stream"])
async def test_a_lost_decode_worker_is_replaced_and_the_stream_goes_on_with_no_gap_or_repeat(
    after: int,
) -> None:
    """The router holds the prompt and every token sent: another decode worker recomputes them and goes on
    after the last one. The client sees the colocated tokens, once each, and never knows."""
    slow_prefill = LatencyModel(prefill=((1, 0.3), (2048, 0.3)))  # time to fail its decode worker before
    async with FakeCluster(decode=2, latency=slow_prefill) as cluster:

        def planned_on() -> str:
            record = cluster.requests.get("resumed")
            assert record is not None and record.decode_instance is not None
            return record.decode_instance

        tokens: list[int] = []
        async with contextlib.aclosing(cluster.stream(PROMPT, 40, request_id="resumed")) as stream:
            if after == 0:  # lost before it decodes a token: while its prompt is still prefilling
                first = asyncio.ensure_future(anext(stream))
                await cluster.wait_for("planned", lambda: cluster.requests.get("resumed") is not None)
                lost = planned_on()
                cluster.client.fail(f"pdflow-{lost}")
                tokens.extend((await first).token_ids)
            async for chunk in stream:
                tokens.extend(chunk.token_ids)
                if after and len(tokens) == after:
                    lost = planned_on()
                    cluster.client.fail(f"pdflow-{lost}")
        assert tokens == colocated(PROMPT, 40)
        assert cluster.states("resumed")[-1] is RequestState.FINISHED_LENGTH
        assert planned_on() != lost  # it finished on the other one
        # once: a second lost worker is the client's error, with the tokens so far right
        cluster.client.fail(f"pdflow-{planned_on()}")
        got: list[int] = []
        with pytest.raises(WorkerFailed, match=r"decode worker decode-[01] failed"):
            async for chunk in cluster.stream(PROMPT, 40, request_id="twice"):
                got.extend(chunk.token_ids)
        assert got == colocated(PROMPT, len(got))
        await cluster.wait_idle()


async def test_a_hand_off_whose_kv_does_not_land_is_recomputed_on_another_decode_worker() -> None:
    """The planned decode worker cannot take the prompt's KV (stopped, gone: here every write fails): the
    prefill still returns its token, and another decode worker recomputes the prompt. It used to fail the
    prefill, and the client got an error for a worker it never needed."""
    async with FakeCluster(decode=2) as cluster:
        cluster.fabric.fail_writes = 10**6
        tokens, finish = await cluster.generate(PROMPT, 20, request_id="unlanded")
        assert (tokens, finish) == (colocated(PROMPT, 20), "length")
        record = cluster.requests.get("unlanded")
        assert record is not None and record.transfer is not None
        assert record.transfer.outcome.value == "failed"
        cluster.fabric.fail_writes = 0
        await cluster.wait_idle()


async def test_a_hung_decode_engine_is_left_behind_and_reported_dead() -> None:
    """A decode engine that stops making progress (a stopped engine core) says nothing: past the token
    deadline the request goes on elsewhere, recomputed, and past worker.hung_timeout_s the worker reports
    DEAD, so that nothing new goes its way."""
    overrides = {"frontdoor.token_timeout_s": 1.0, "worker.hung_timeout_s": 0.5}
    async with FakeCluster(decode=2, overrides=overrides) as cluster:
        tokens: list[int] = []
        hung = ""
        async for chunk in cluster.stream(PROMPT, 40, request_id="stalled"):
            tokens.extend(chunk.token_ids)
            if len(tokens) == 5:
                record = cluster.requests.get("stalled")
                assert record is not None and record.decode_instance is not None
                hung = record.decode_instance
                cluster.engines[f"pdflow-{hung}"].hang()
        assert tokens == colocated(PROMPT, 40)
        await cluster.wait_for(
            f"{hung} reported DEAD",
            lambda: hung not in {i.instance_id for i in cluster.router.snapshot.live(Role.DECODE)},
        )
        # and its pod's liveness probe fails: the kubelet restarts it
        assert cluster.workers[f"pdflow-{hung}"].health()["engine_alive"] is False
        cluster.engines[f"pdflow-{hung}"].resume()  # let it finish what it holds, for the leak check
        await cluster.wait_idle()


async def test_a_prefill_engine_that_dies_gives_a_clear_error_before_any_token() -> None:
    async with FakeCluster(decode=1) as cluster:
        cluster.engines["pdflow-prefill-0"].kill()
        with pytest.raises(WorkerFailed, match="prefill worker prefill-0 failed: engine prefill-0 is dead"):
            await cluster.generate(PROMPT, 8, request_id="no-prefill")
        assert cluster.states("no-prefill")[-1] is RequestState.FINISHED_ERROR
        # the worker reports itself DEAD; the front door then sends no request its way
        await cluster.wait_for(
            "prefill-0 reported DEAD", lambda: not cluster.router.snapshot.live(Role.PREFILL)
        )
        with pytest.raises(PoolEmpty, match="prefill pool is empty"):
            await cluster.generate(PROMPT, 8)


async def test_a_prefill_worker_that_fails_is_replaced_once_and_the_client_never_knows() -> None:
    async with FakeCluster(prefill=3, decode=1) as cluster:
        cluster.client.fail("pdflow-prefill-0")  # the least loaded by name: dispatch picks it
        tokens, finish = await cluster.generate(PROMPT, 8, request_id="retried")
        assert tokens == colocated(PROMPT, 8) and finish == "length"
        record = cluster.requests.get("retried")
        assert record is not None and record.prefill_instance == "prefill-1"
        # one retry: a second failure is the client's error, naming the worker that failed last (every
        # worker fails now: which two it tries depends on the loads they last reported)
        cluster.client.fail("pdflow-prefill-1")
        cluster.client.fail("pdflow-prefill-2")
        with pytest.raises(WorkerFailed, match=r"prefill worker prefill-[012] failed"):
            await cluster.generate(PROMPT, 8, request_id="twice")
        await cluster.wait_idle()


def test_this_tier_runs_without_vllm_or_ray() -> None:
    """Everything these tests run (the router, the workers, the fake engines, the exchange, the coordinator)
    imports neither vLLM nor Ray: they run anywhere, in seconds."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, tests.support.fake_cluster, tests.integration.test_migration_path; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'vllm', 'ray'}))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


async def test_a_request_that_ends_on_the_clients_stop_string_counts_as_finished(
    model_tokenizer: Any,
) -> None:
    """It used to be recorded as aborted and left out of the latency histograms."""
    from frontdoor.textgen import TextGenerator, TextRequest

    async with FakeCluster(decode=1) as cluster:
        text = model_tokenizer.decode(colocated(PROMPT, 40))
        stop = text[len(text) // 2 : len(text) // 2 + 3]  # met about half-way through
        textgen = TextGenerator(cluster.router, model_tokenizer, "m", 2048, 64)
        req = TextRequest(
            model="m",
            request_id=RequestId("stopped"),
            prompt_token_ids=list(PROMPT),
            max_tokens=40,
            stop=[stop],
        )
        deltas = [d async for d in textgen.stream(req)]
        assert deltas[-1].finish_reason is FinishReason.STOP
        assert cluster.states("stopped")[-1] is RequestState.FINISHED_STOP
        figures = _metrics(cluster)
        assert figures['pdflow_requests_total{outcome="stop"}'] == 1
        assert figures['pdflow_requests_total{outcome="aborted"}'] == 0
        assert figures["pdflow_time_to_first_token_seconds_count"] == 1  # in the latency figures
        await cluster.wait_idle()  # the workers were still told to stop: nothing held


async def test_past_max_waiting_a_request_is_refused_at_once_and_served_once_there_is_room() -> None:
    """At overload a request used to queue until its prefill deadline (a 504 after 120 s, the compute
    spent); now the front door answers at once, 429 with Retry-After, and takes it again once prefills end."""
    slow_prefill = LatencyModel(prefill=((1, 0.4), (2048, 0.4)))
    overrides = {"frontdoor.max_waiting": 2}
    async with FakeCluster(prefill=1, decode=1, latency=slow_prefill, overrides=overrides) as cluster:
        first = [asyncio.create_task(cluster.generate(PROMPT, 4, request_id=f"w{i}")) for i in range(2)]
        await cluster.wait_for("two waiting", lambda: sum(cluster.router.in_flight().values()) == 2)
        with pytest.raises(Overloaded, match="2 requests already wait for their first token") as refused:
            await cluster.generate(PROMPT, 4, request_id="third")
        assert refused.value.http_status == 429 and refused.value.retry_after_s == 1
        assert cluster.states("third") == []  # refused before anything was spent on it
        for _, finish in await asyncio.gather(*first):
            assert finish == "length"
        tokens, finish = await cluster.generate(PROMPT, 4, request_id="later")
        assert tokens == colocated(PROMPT, 4) and finish == "length"
        assert _metrics(cluster)['pdflow_requests_total{outcome="rejected"}'] == 1
        await cluster.wait_idle()


async def test_a_request_whose_first_token_would_come_too_late_is_refused_at_once() -> None:
    """Once a first token has shown how fast the prefill pool serves prompts, a request that would wait past
    the TTFT SLO (times frontdoor.admission_slo_factor) behind those already waiting gets 429 at once, with
    a Retry-After of the excess; a shorter queue takes it."""
    prompt = tuple(range(100, 400))  # 300 tokens: enough prefill work for its first token to teach the rate
    slow_prefill = LatencyModel(prefill=((1, 0.4), (2048, 0.4)))  # 0.4 s a prompt: 750 tokens/s
    overrides = {"autoscaler.ttft_slo_s": 1.0, "engine.kv_blocks": 1024}
    async with FakeCluster(prefill=1, decode=1, latency=slow_prefill, overrides=overrides) as cluster:
        await cluster.generate(
            prompt, 2, request_id="teacher"
        )  # the pool's rate, learned from its first token
        waiting = [asyncio.create_task(cluster.generate(prompt, 2, request_id=f"w{i}")) for i in range(2)]
        await cluster.wait_for("two waiting", lambda: sum(cluster.router.in_flight().values()) == 2)
        with pytest.raises(Overloaded, match=r"first token would come in about [0-9.]+ s") as refused:
            await cluster.generate(prompt, 2, request_id="third")  # behind two: about 1.2 s
        assert refused.value.http_status == 429 and refused.value.retry_after_s >= 1
        assert cluster.states("third") == []
        await asyncio.gather(*waiting)
        tokens, _ = await cluster.generate(prompt, 2, request_id="later")  # an empty queue: served
        assert tokens == colocated(prompt, 2)
        await cluster.wait_idle()


def _metrics(cluster: FakeCluster) -> dict[str, float]:
    """The front door's /metrics page as {series: value}."""
    values = {}
    for line in cluster.metrics.exposition()[0].decode().splitlines():
        if line.startswith("pdflow_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def test_under_overload_a_more_important_request_is_admitted_and_served_before_waiting_ones() -> None:
    """Low-priority requests fill the queue: one more of them is refused, while a request of higher priority
    is admitted (it waits only behind its peers) and its prompt is computed before the low ones waiting."""
    slow_prefill = LatencyModel(prefill=((1, 0.3), (2048, 0.3)))
    overrides = {"frontdoor.max_waiting": 2}
    async with FakeCluster(prefill=1, decode=1, latency=slow_prefill, overrides=overrides) as cluster:
        firsts: list[str] = []

        async def client(rid: str, priority: int) -> None:
            async for chunk in cluster.stream(PROMPT, 4, request_id=rid, priority=priority):
                if chunk.token_ids and rid not in firsts:
                    firsts.append(rid)

        low = [asyncio.create_task(client(f"low-{i}", 0)) for i in range(2)]
        await cluster.wait_for("two waiting", lambda: sum(cluster.router.in_flight().values()) == 2)
        with pytest.raises(Overloaded):
            await cluster.generate(PROMPT, 4, request_id="low-refused")
        await client("high", 1)
        await asyncio.gather(*low)
        assert firsts == ["low-0", "high", "low-1"]  # low-0 was already being computed
        await cluster.wait_idle()
