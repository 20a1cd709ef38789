"""Trace replay over the OpenAI HTTP API: the load generator behind ``pdctl bench`` and ``make demo``.

``run_bench`` sends each ``TraceRequest`` at its (scaled) arrival time as a streaming ``/v1/completions`` call
whose prompt is exactly ``prompt_tokens`` synthetic token ids and whose output is forced to ``output_tokens``
(``ignore_eos``), so the server does the work the trace describes. It measures TTFT, TPOT and end-to-end
latency per request. ``summarize`` and ``percentile`` are pure and turn records into the summary.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from protocol.auth import api_key_headers
from simulator.traces import TraceRequest

DEFAULT_VOCAB_SIZE = 49152  # SmolLM2
FIRST_ORDINARY_TOKEN_ID = 100  # ids below are special tokens in the tokenizers we serve


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One replayed request. Times are seconds; ``scheduled_s``/``sent_s``/``finished_s`` count from the start
    of the replay (``sent_s`` is later than ``scheduled_s`` when the concurrency limit held the request)."""

    index: int
    prompt_tokens: int
    max_tokens: int
    scheduled_s: float
    sent_s: float
    finished_s: float
    ok: bool
    completion_tokens: int
    ttft_s: float | None
    tpot_s: float | None  # None with fewer than two output tokens
    e2e_s: float | None
    http_status: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class LatencyStats:
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


@dataclass(frozen=True, slots=True)
class BenchSummary:
    count: int
    ok: int
    errors: int
    duration_s: float
    request_throughput: float  # successful requests per second
    output_tokens_per_s: float  # output tokens of successful requests per second
    ttft: LatencyStats
    tpot: LatencyStats
    e2e: LatencyStats
    slo_ttft_s: float
    slo_tpot_s: float
    slo_attainment: float | None  # share of all requests that succeeded within both SLOs


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's default)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_stats(values: Sequence[float]) -> LatencyStats:
    mean = sum(values) / len(values) if values else None
    return LatencyStats(mean, percentile(values, 50), percentile(values, 90), percentile(values, 99))


def meets_slo(record: RequestRecord, slo_ttft_s: float, slo_tpot_s: float) -> bool:
    """A request meets the SLOs when it succeeded, its TTFT and its TPOT (if it has one) are within them."""
    return (
        record.ok
        and record.ttft_s is not None
        and record.ttft_s <= slo_ttft_s
        and (record.tpot_s is None or record.tpot_s <= slo_tpot_s)
    )


def summarize(
    records: Sequence[RequestRecord], *, slo_ttft_s: float, slo_tpot_s: float, duration_s: float | None = None
) -> BenchSummary:
    """Summary of a replay. Latencies cover successful requests; SLO attainment counts failures as misses.
    ``duration_s`` defaults to the time from the replay's start to the last request's end."""
    if duration_s is None:
        duration_s = max((r.finished_s for r in records), default=0.0)
    good = [r for r in records if r.ok]
    tokens = sum(r.completion_tokens for r in good)
    met = sum(meets_slo(r, slo_ttft_s, slo_tpot_s) for r in records)
    return BenchSummary(
        count=len(records),
        ok=len(good),
        errors=len(records) - len(good),
        duration_s=duration_s,
        request_throughput=len(good) / duration_s if duration_s > 0 else 0.0,
        output_tokens_per_s=tokens / duration_s if duration_s > 0 else 0.0,
        ttft=latency_stats([r.ttft_s for r in good if r.ttft_s is not None]),
        tpot=latency_stats([r.tpot_s for r in good if r.tpot_s is not None]),
        e2e=latency_stats([r.e2e_s for r in good if r.e2e_s is not None]),
        slo_ttft_s=slo_ttft_s,
        slo_tpot_s=slo_tpot_s,
        slo_attainment=met / len(records) if records else None,
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.1f}"


@dataclass(frozen=True, slots=True)
class BenchResult:
    base_url: str
    model: str
    records: tuple[RequestRecord, ...]
    summary: BenchSummary

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(
            {
                "base_url": self.base_url,
                "model": self.model,
                "summary": asdict(self.summary),
                "records": [asdict(r) for r in self.records],
            },
            indent=indent,
        )

    def render_table(self, console: Console) -> None:
        s = self.summary
        overview = Table(title=f"pdctl bench: {self.model} at {self.base_url}", show_header=False)
        overview.add_column("what")
        overview.add_column("value", justify="right")
        overview.add_row("requests (ok / errors)", f"{s.count} ({s.ok} / {s.errors})")
        overview.add_row("duration", f"{s.duration_s:.2f} s")
        overview.add_row("request throughput", f"{s.request_throughput:.2f} req/s")
        overview.add_row("output tokens/s", f"{s.output_tokens_per_s:.1f}")
        attainment = "-" if s.slo_attainment is None else f"{s.slo_attainment:.1%}"
        overview.add_row(
            f"SLO attainment (TTFT <= {_ms(s.slo_ttft_s)} ms, TPOT <= {_ms(s.slo_tpot_s)} ms)", attainment
        )
        latency = Table(title="latency (ms, successful requests)")
        for column in ("metric", "mean", "p50", "p90", "p99"):
            latency.add_column(column, justify="left" if column == "metric" else "right")
        for name, stats in (("TTFT", s.ttft), ("TPOT", s.tpot), ("end-to-end", s.e2e)):
            latency.add_row(name, _ms(stats.mean), _ms(stats.p50), _ms(stats.p90), _ms(stats.p99))
        console.print(overview)
        console.print(latency)
        causes = Counter(
            f"HTTP {r.http_status}: {r.error}" if r.http_status else str(r.error)
            for r in self.records
            if not r.ok
        )
        if causes:
            errors = Table(title="errors")
            errors.add_column("count", justify="right")
            errors.add_column("error")
            for cause, n in causes.most_common(10):
                errors.add_row(str(n), cause)
            console.print(errors)


def synthesize_prompt(
    num_tokens: int, *, index: int, seed: int = 0, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> list[int]:
    """``num_tokens`` pseudo-random ordinary token ids, the same for the same (seed, index). Random ids share
    no prefix, so prefix caching cannot shorten a prefill the trace asks for."""
    if vocab_size <= FIRST_ORDINARY_TOKEN_ID:
        raise ValueError(f"vocab_size must be > {FIRST_ORDINARY_TOKEN_ID}, got {vocab_size}")
    rng = random.Random(seed * 1_000_003 + index)
    return rng.choices(range(FIRST_ORDINARY_TOKEN_ID, vocab_size), k=num_tokens)


def _error_message(body: bytes) -> str:
    """The message of an OpenAI error body (``{"error": {"message": ...}}``), vLLM's older flat form, or
    FastAPI's ``detail``; else the start of the body."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:300] or "(empty body)"
    if isinstance(payload, dict):
        inner = payload.get("error", payload)
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
        if "detail" in payload:
            return str(payload["detail"])
    return str(payload)[:300]


async def _send(
    client: httpx.AsyncClient, body: dict[str, Any], timeout_s: float, clock: asyncio.AbstractEventLoop
) -> tuple[float | None, float, int, int | None, str | None]:
    """Stream one completion: (ttft, e2e, completion tokens, HTTP status, error). The deadline covers the
    whole stream."""
    sent = clock.time()
    post = client.stream("POST", "/v1/completions", json=body)
    first: float | None = None
    chunks, usage_tokens, done, status = 0, None, False, None
    try:
        async with asyncio.timeout(timeout_s), post as response:
            status = response.status_code
            if status != 200:
                return None, clock.time() - sent, 0, status, _error_message(await response.aread())
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk or chunk.get("object") == "error":
                    return None, clock.time() - sent, chunks, status, _error_message(data.encode())
                if chunk.get("choices"):
                    first = clock.time() if first is None else first
                    chunks += 1
                if chunk.get("usage"):
                    usage_tokens = int(chunk["usage"]["completion_tokens"])
    except TimeoutError:
        return None, clock.time() - sent, chunks, status, f"no complete response within {timeout_s:g} s"
    except (httpx.HTTPError, ValueError, KeyError) as e:
        return None, clock.time() - sent, chunks, status, f"{type(e).__name__}: {e}"
    e2e = clock.time() - sent
    if not done:
        return None, e2e, chunks, status, "stream ended without [DONE]"
    if first is None:
        return None, e2e, 0, status, "no token in the response"
    # Usage is authoritative: one chunk may carry several tokens.
    return first - sent, e2e, chunks if usage_tokens is None else usage_tokens, status, None


async def run_bench(
    base_url: str,
    model: str,
    requests: Sequence[TraceRequest],
    *,
    tokenizer_vocab_size: int | None,
    slo_ttft_s: float,
    slo_tpot_s: float,
    concurrency_limit: int | None,
    progress: bool,
    request_timeout_s: float,
    seed: int = 0,
) -> BenchResult:
    """Replay ``requests`` against ``{base_url}/v1/completions`` in real time (arrivals as given; scale them
    when loading the trace) and measure each. ``concurrency_limit`` caps requests in flight (a held request
    is sent late, and its latencies count from the send); ``request_timeout_s`` is each request's deadline.
    Never raises for a failed request: failures are records with their HTTP status and message."""
    if concurrency_limit is not None and concurrency_limit < 1:
        raise ValueError(f"concurrency_limit must be >= 1, got {concurrency_limit}")
    vocab_size = tokenizer_vocab_size or DEFAULT_VOCAB_SIZE
    clock = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency_limit) if concurrency_limit else None
    records: list[RequestRecord] = []
    errors = 0
    bar = Progress(
        TextColumn("replaying"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("errors: {task.fields[errors]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not progress,
    )
    task_id = bar.add_task("replay", total=len(requests), errors=0)
    # Unlimited connections: waiting for a pooled connection would count as server latency.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    start = 0.0  # set once the client is built: building it (TLS setup) can take a second

    async def replay(index: int, request: TraceRequest) -> None:
        nonlocal errors
        prompt = synthesize_prompt(request.prompt_tokens, index=index, seed=seed, vocab_size=vocab_size)
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": request.output_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        if gate is not None:
            await gate.acquire()
        try:
            sent_s = clock.time() - start
            ttft, e2e, tokens, status, error = await _send(client, body, request_timeout_s, clock)
        finally:
            if gate is not None:
                gate.release()
        tpot = (e2e - ttft) / (tokens - 1) if error is None and ttft is not None and tokens > 1 else None
        records.append(
            RequestRecord(
                index=index,
                prompt_tokens=request.prompt_tokens,
                max_tokens=request.output_tokens,
                scheduled_s=request.arrival_s,
                sent_s=sent_s,
                finished_s=clock.time() - start,
                ok=error is None,
                completion_tokens=tokens,
                ttft_s=ttft,
                tpot_s=tpot,
                e2e_s=e2e if error is None else None,
                http_status=status,
                error=error,
            )
        )
        errors += error is not None
        bar.update(task_id, advance=1, errors=errors)

    timeout = httpx.Timeout(request_timeout_s)
    headers = api_key_headers()
    async with httpx.AsyncClient(
        base_url=base_url, timeout=timeout, limits=limits, headers=headers
    ) as client:
        with bar:
            start = clock.time()
            async with asyncio.TaskGroup() as group:
                for index, request in enumerate(requests):
                    delay = start + request.arrival_s - clock.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    group.create_task(replay(index, request))
    duration = clock.time() - start
    ordered = tuple(sorted(records, key=lambda r: r.index))
    return BenchResult(
        base_url=base_url,
        model=model,
        records=ordered,
        summary=summarize(ordered, slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s, duration_s=duration),
    )
