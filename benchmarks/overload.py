"""Overload: a real 1P+1D cluster (vLLM CPU engines, SmolLM2) driven at ``--factor`` times its capacity; what
its clients get. Prints a table and writes JSON.

    .venv/bin/python benchmarks/overload.py [--factor 10] [--seconds 60] [--json results/overload.json]

1. Capacity: Poisson arrivals of one request shape (``--prompt-tokens`` of random ids, ``--output-tokens``
   with ignore_eos) at rising rates, ``--step-seconds`` each; the capacity is the highest goodput (requests/s
   meeting both SLOs) among the rates where at least 90% of requests met them.
2. Overload: ``--factor`` x the capacity's rate for ``--seconds``, with ``/health`` polled every 100 ms.
   Reported: every status, 5xx among them; how fast rejections came and whether each carried Retry-After;
   the admitted requests' TTFT against the SLO; /health latency; goodput against the capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdctl.bench import synthesize_prompt  # noqa: E402
from pdctl.local_cluster import LocalCluster, apply_env_defaults, free_port  # noqa: E402
from pdctl.model_cache import MODEL_NAME, default_cache_dir, prepare_model  # noqa: E402
from protocol.config import ClusterConfig  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 150)


@dataclass
class Outcome:
    sent_s: float  # since the run began
    status: int | None
    answered_s: float  # response headers, from the send
    ttft_s: float | None
    tpot_s: float | None
    retry_after: str | None
    error: str | None

    def good(self, ttft_slo: float, tpot_slo: float) -> bool:
        return (
            self.error is None
            and self.ttft_s is not None
            and self.ttft_s <= ttft_slo
            and (self.tpot_s is None or self.tpot_s <= tpot_slo)
        )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factor", type=float, default=10.0, help="overload as a multiple of the capacity's rate")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the overload")
    p.add_argument("--rates", default="0.5,1,2,3,4,6", help="request rates (per s) of the capacity steps")
    p.add_argument("--step-seconds", type=float, default=20.0)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--ttft-slo", type=float, default=2.0)
    p.add_argument("--tpot-slo", type=float, default=0.2)
    p.add_argument("--json", type=Path, default=ROOT / "results" / "overload.json")
    return p.parse_args()


async def _request(client: httpx.AsyncClient, body: dict[str, Any], start: float) -> Outcome:
    sent = time.monotonic()
    first: float | None = None
    tokens = 0
    try:
        async with asyncio.timeout(180), client.stream("POST", "/v1/completions", json=body) as response:
            answered = time.monotonic() - sent
            retry_after = response.headers.get("retry-after")
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return Outcome(
                    sent - start, response.status_code, answered, None, None, retry_after, text[:200]
                )
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                if "error" in chunk:
                    return Outcome(sent - start, 200, answered, None, None, None, str(chunk["error"])[:200])
                if chunk.get("choices"):
                    first = time.monotonic() if first is None else first
                    tokens += 1
    except (TimeoutError, httpx.HTTPError) as exc:
        return Outcome(sent - start, None, time.monotonic() - sent, None, None, None, f"{type(exc).__name__}")
    end = time.monotonic()
    ttft = None if first is None else first - sent
    tpot = (end - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return Outcome(sent - start, 200, answered, ttft, tpot, None, None if first else "no token")


async def drive(url: str, rate: float, seconds: float, args: argparse.Namespace, seed: int) -> list[Outcome]:
    """Poisson arrivals at ``rate`` for ``seconds``; every request's outcome (waits for the last one)."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=None) as client:
        start = time.monotonic()
        tasks: list[asyncio.Task[Outcome]] = []
        at = 0.0
        index = 0
        while at < seconds:
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            prompt = synthesize_prompt(args.prompt_tokens, index=index, seed=seed)
            body = {
                "model": MODEL_NAME,
                "prompt": prompt,
                "max_tokens": args.output_tokens,
                "ignore_eos": True,
                "stream": True,
            }
            tasks.append(asyncio.create_task(_request(client, body, start)))
            index += 1
            at += rng.expovariate(rate)
        return list(await asyncio.gather(*tasks))


async def poll_health(url: str, stop: asyncio.Event) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while not stop.is_set():
            sent = time.monotonic()
            with contextlib.suppress(httpx.HTTPError):  # a failed probe counts by its time too
                await client.get("/health")
            latencies.append(time.monotonic() - sent)
            await asyncio.sleep(0.1)
    return latencies


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def goodput(outcomes: list[Outcome], seconds: float, args: argparse.Namespace) -> float:
    return sum(o.good(args.ttft_slo, args.tpot_slo) for o in outcomes) / seconds


async def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    steps = []
    capacity_rate, capacity = 0.0, 0.0
    for i, rate in enumerate(float(r) for r in args.rates.split(",")):
        outcomes = await drive(url, rate, args.step_seconds, args, seed=100 + i)
        met = sum(o.good(args.ttft_slo, args.tpot_slo) for o in outcomes) / max(1, len(outcomes))
        put = goodput(outcomes, args.step_seconds, args)
        ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
        steps.append({"rate": rate, "requests": len(outcomes), "attainment": met, "goodput": put,
                      "ttft_p99": pct(ttfts, 99)})  # fmt: skip
        console.print(
            f"capacity step {rate:g}/s: {len(outcomes)} requests, {met:.0%} met the SLOs, goodput {put:.2f}/s"
        )
        if met >= 0.9 and put > capacity:
            capacity_rate, capacity = rate, put
        if met < 0.5:
            break
    if capacity == 0:
        raise SystemExit("no rate met the SLOs for 90% of requests: lower --rates")
    rate = args.factor * capacity_rate
    console.print(
        f"overload: {rate:g} requests/s ({args.factor:g} x {capacity_rate:g}) for {args.seconds:g} s"
    )
    stop = asyncio.Event()
    health = asyncio.create_task(poll_health(url, stop))
    outcomes = await drive(url, rate, args.seconds, args, seed=7)
    stop.set()
    health_latencies = await health
    statuses = Counter(str(o.status) for o in outcomes)
    rejected = [o for o in outcomes if o.status in (429, 503)]
    admitted = [o for o in outcomes if o.status == 200]
    ttfts = [o.ttft_s for o in admitted if o.ttft_s is not None]
    return {
        "capacity_steps": steps,
        "capacity_rate": capacity_rate,
        "capacity_goodput": capacity,
        "overload_rate": rate,
        "requests": len(outcomes),
        "statuses": dict(statuses),
        "server_errors": sum(
            1 for o in outcomes if o.status is not None and o.status >= 500 and o.status != 503
        ),
        "transport_errors": sum(1 for o in outcomes if o.status is None),
        "rejected": len(rejected),
        "rejected_with_retry_after": sum(1 for o in rejected if o.retry_after),
        "rejection_p50_s": pct([o.answered_s for o in rejected], 50),
        "rejection_p99_s": pct([o.answered_s for o in rejected], 99),
        "admitted": len(admitted),
        "admitted_failed": sum(1 for o in admitted if o.error),
        "admitted_ttft_p50_s": pct(ttfts, 50),
        "admitted_ttft_p99_s": pct(ttfts, 99),
        "health_p50_s": pct(health_latencies, 50),
        "health_p99_s": pct(health_latencies, 99),
        "health_polls": len(health_latencies),
        "goodput": goodput(outcomes, args.seconds, args),
        "outcomes": [asdict(o) for o in outcomes],
    }


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    def s(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s"

    capacity = f"capacity {r['capacity_goodput']:.2f} good req/s at {r['capacity_rate']:g}/s"
    table = Table(title=f"{args.factor:g}x overload for {args.seconds:g} s ({capacity})")
    table.add_column("figure")
    table.add_column("measured", justify="right")
    table.add_column("goal", justify="right")
    table.add_row("requests sent", str(r["requests"]), "")
    table.add_row("statuses", ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items())), "")
    table.add_row("5xx other than 503", str(r["server_errors"]), "0")
    table.add_row(
        "rejections with Retry-After", f"{r['rejected_with_retry_after']} of {r['rejected']}", "all"
    )
    table.add_row(
        "rejection latency p50 / p99",
        f"{s(r['rejection_p50_s'])} / {s(r['rejection_p99_s'])}",
        "p99 <= 100 ms",
    )
    table.add_row(
        "admitted TTFT p50 / p99",
        f"{s(r['admitted_ttft_p50_s'])} / {s(r['admitted_ttft_p99_s'])}",
        f"p99 <= {2 * args.ttft_slo:g} s",
    )
    table.add_row("admitted that failed", str(r["admitted_failed"]), "0")
    table.add_row("/health p50 / p99", f"{s(r['health_p50_s'])} / {s(r['health_p99_s'])}", "p99 <= 200 ms")
    ratio = r["goodput"] / r["capacity_goodput"]
    table.add_row("goodput", f"{r['goodput']:.2f}/s ({ratio:.0%} of capacity)", ">= 80%")
    console.print(table)


def main() -> None:
    args = parse_args()
    apply_env_defaults(default_cache_dir().parents[1])
    cfg = ClusterConfig.load(
        None,
        {
            "frontdoor.http_port": free_port(),
            "frontdoor.grpc_port": free_port(),
            "controller.admin_port": free_port(),
        },
    )
    cluster = LocalCluster(cfg, prepare_model())
    with console.status("starting a 1P+1D cluster"):
        handle = cluster.start()
        cluster.wait_until_serving()
    try:
        result = asyncio.run(run(handle.http_url, args))
    finally:
        cluster.stop()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    report(result, args)
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
