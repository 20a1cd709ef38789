"""Autoscaling on real engines: a local cluster (Ray, vLLM CPU engines with SmolLM2) starts at 1P+1D with the
autoscaler on; a load whose request lengths come from the Azure conversation trace (clipped for a CPU) and
whose arrival rate follows a profile rises from half of what one decode instance should carry
(``autoscaler.target_decode_tps``) to about three times that, holds, and falls back to 0.9 times it. Then
the same load, the same seed, runs on a static allocation sized for the peak (1P+3D, autoscaler off).

It samples the autoscaler every second and measures every request (TTFT, TPOT, the largest gap between two
of its tokens, failures), and reports: failed requests (every request on a drained instance included),
migrations done by scale-in and the largest gap a client saw across them, instance-seconds used against the
static allocation, and the SLO attainment of both runs. It prints a table, writes JSON and a PNG timeline
(offered load, decode tokens/s, desired and ready P and D, TTFT and TPOT p99).

``target_decode_tps`` comes from a calibration run (one decode engine, closed-loop clients: its saturated
decode tokens/s, divided by 3) unless ``--target-tps`` is given. On this 2-core machine every engine shares
the same two cores, so the machine as a whole serves about what one saturated engine serves: a target of a
third of that lets the peak (three instances' worth) fit the machine. On a GPU cluster each instance has its
own accelerator and the target is one instance's tokens/s at its SLO.

    .venv/bin/python benchmarks/autoscaling.py [--target-tps X] [--time-scale 1.0] [--no-static]
        [--output results/autoscaling.json] [--png results/autoscaling.png]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRACE = ROOT / "benchmarks" / "traces" / "AzureLLMInferenceTrace_conv.csv"
# (seconds from the start, offered load as a multiple of target_decode_tps): linear between the points. The
# tail is at 0.9x: one instance would do, but each survivor of 2 -> 1 would carry 0.9x, over the
# consolidation check's 0.8x, so the pool should stop at 2 rather than flap; and the victims of 3 -> 2 have
# requests running when they are drained.
PROFILE = ((0, 0.5), (60, 0.5), (240, 3.0), (420, 3.0), (540, 0.9), (840, 0.9))


@dataclass
class Req:
    sent: float  # seconds from the run's start
    prompt_tokens: int
    max_tokens: int
    ok: bool = False
    error: str = ""
    request_id: str = ""
    ttft: float | None = None
    tpot: float | None = None
    max_gap: float = 0.0  # the largest gap between two of its tokens
    tokens: int = 0


@dataclass
class Run:
    name: str
    requests: list[Req] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # one a second
    decisions: list[dict[str, Any]] = field(default_factory=list)
    drain_migrations: list[dict[str, Any]] = field(default_factory=list)


def _rate_multiple(t: float, scale: float) -> float:
    points = [(at * scale, m) for at, m in PROFILE]
    for (t0, m0), (t1, m1) in itertools.pairwise(points):
        if t0 <= t <= t1:
            return m0 + (m1 - m0) * (t - t0) / (t1 - t0) if t1 > t0 else m1
    return points[-1][1]


def _schedule(target_tps: float, scale: float, seed: int, max_prompt: int, max_output: int) -> list[Req]:
    """Arrivals of an inhomogeneous Poisson process whose output tokens/s follow the profile; lengths drawn
    from the trace (clipped)."""
    from simulator.traces import load_trace

    trace = load_trace(TRACE, max_prompt_tokens=max_prompt, max_output_tokens=max_output, max_requests=5000)
    lengths = [(r.prompt_tokens, r.output_tokens) for r in trace.requests]
    mean_out = statistics.fmean(o for _, o in lengths)
    rng = random.Random(seed)
    end = PROFILE[-1][0] * scale
    peak = max(m for _, m in PROFILE) * target_tps / mean_out  # requests/s at the peak
    reqs: list[Req] = []
    t = 0.0
    while True:  # thinning: candidates at the peak rate, kept with probability rate(t) / peak
        t += rng.expovariate(peak)
        if t >= end:
            return reqs
        if rng.random() <= _rate_multiple(t, scale) * target_tps / mean_out / peak:
            p, o = rng.choice(lengths)
            reqs.append(Req(t, p, o))


async def send_one(client: Any, model: str, req: Req, index: int, seed: int, start: float) -> None:
    from pdctl.bench import synthesize_prompt

    await asyncio.sleep(max(0.0, start + req.sent - time.monotonic()))
    body = {
        "model": model,
        "prompt": synthesize_prompt(req.prompt_tokens, index=index, seed=seed),
        "max_tokens": req.max_tokens,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.monotonic()
    last, first = sent, None
    try:
        async with asyncio.timeout(600), client.stream("POST", "/v1/completions", json=body) as response:
            req.request_id = response.headers.get("X-Request-Id", "")
            if response.status_code != 200:
                req.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    req.error = str(chunk["error"])[:200]
                    return
                if chunk.get("choices"):
                    now = time.monotonic()
                    if first is None:
                        first = now
                    else:
                        req.max_gap = max(req.max_gap, now - last)
                    last = now
                if chunk.get("usage"):
                    req.tokens = int(chunk["usage"]["completion_tokens"])
    except Exception as exc:  # a failed request is a record, never a crash of the benchmark
        req.error = f"{type(exc).__name__}: {exc}"[:200]
        return
    if not done or first is None:
        req.error = "stream ended without [DONE]" if first is not None else "no token"
        return
    req.ok = True
    req.ttft = first - sent
    if req.tokens > 1:
        req.tpot = (last - first) / (req.tokens - 1)


async def _sampler(admin: str, run: Run, start: float, stop: asyncio.Event, offered: Any) -> None:
    from pdctl.admin_client import AdminClient, AdminUnavailable

    with AdminClient(admin) as client:
        while not stop.is_set():
            t = time.monotonic() - start
            sample: dict[str, Any] = {"t": t, "offered_tps": offered(t)}
            try:
                st = await asyncio.to_thread(client.status)
                sample["decode_tps"] = sum(i.decode_tps for i in st.instances if i.role == "decode")
                sample["alive"] = {
                    role: sum(1 for i in st.instances if i.role == role and i.state != "DEAD")
                    for role in ("prefill", "decode")
                }
                try:
                    a = await asyncio.to_thread(client.autoscaler)
                    for pool in a.pools:
                        sample[pool.role] = {
                            "desired": pool.desired,
                            "ready": pool.ready,
                            "pending": pool.pending,
                            "draining": pool.draining,
                        }
                except AdminUnavailable:  # a static run: no autoscaler
                    pass
            except AdminUnavailable as exc:
                sample["error"] = str(exc)
            run.samples.append(sample)
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - start - t)))


async def _drive(
    url: str, admin: str, reqs: list[Req], run: Run, seed: int, target: float, scale: float
) -> None:
    import httpx
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pdctl.chat import served_model

    model = served_model(url)
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=None) as client:
        start = time.monotonic()
        sampler = asyncio.create_task(
            _sampler(admin, run, start, stop, lambda t: _rate_multiple(t, scale) * target)
        )
        with Progress(
            TextColumn(f"{run.name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        ) as bar:
            task = bar.add_task(run.name, total=len(reqs))

            async def one(i: int, r: Req) -> None:
                await send_one(client, model, r, i, seed, start)
                bar.advance(task)

            await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
        stop.set()
        await sampler
    run.requests = reqs


def cluster_config(overrides: dict[str, Any]) -> Any:
    from protocol.config import ClusterConfig

    return ClusterConfig.load(
        overrides={
            "frontdoor.http_port": 0,
            "frontdoor.grpc_port": 0,
            "controller.admin_port": 0,
            "migration.mode": "live",
            **overrides,
        },
        environ={},
    )


def with_cluster(cfg: Any, body: Any) -> Any:
    from pdctl.local_cluster import LocalCluster
    from pdctl.model_cache import prepare_model

    cluster = LocalCluster(cfg, prepare_model())
    try:
        handle = cluster.start(lambda m: print(f"  {m}", flush=True))
        cluster.wait_until_serving(120)
        return body(handle)
    finally:
        cluster.stop()


def calibrate(max_prompt: int, max_output: int, seconds: float = 45.0, clients: int = 8) -> float:
    """One decode engine's saturated decode tokens/s: ``clients`` closed-loop clients for ``seconds``."""

    def body(handle: Any) -> float:
        async def go() -> float:
            import httpx

            from pdctl.chat import served_model

            model = served_model(handle.http_url)
            tokens, stop_at = 0, time.monotonic() + seconds

            async def client_loop(k: int) -> None:
                nonlocal tokens
                i = 0
                async with httpx.AsyncClient(base_url=handle.http_url, timeout=None) as client:
                    while time.monotonic() < stop_at:
                        r = Req(0.0, max_prompt // 2, max_output)
                        await send_one(client, model, r, 10_000 * k + i, 99, time.monotonic())
                        i += 1
                        tokens += r.tokens if r.ok else 0

            t0 = time.monotonic()
            await asyncio.gather(*(client_loop(k) for k in range(clients)))
            return tokens / (time.monotonic() - t0)

        return asyncio.run(go())

    print("calibrating: one decode engine, closed-loop clients", flush=True)
    return float(with_cluster(cluster_config({"prefill.replicas": 1, "decode.replicas": 1}), body))


def run_once(name: str, cfg: Any, reqs: list[Req], seed: int, target: float, scale: float) -> Run:
    from pdctl.admin_client import AdminClient

    run = Run(name)

    def body(handle: Any) -> None:
        asyncio.run(_drive(handle.http_url, handle.admin_address, reqs, run, seed, target, scale))
        with AdminClient(handle.admin_address) as client:
            try:
                resp = client.autoscaler_decisions(200, True)
                run.decisions = [json.loads(as_json(d)) for d in resp.decisions]
            except Exception:  # a static run has no autoscaler
                run.decisions = []
            migrations = client.migrations(500)
            run.drain_migrations = [json.loads(as_json(m)) for m in migrations.recent if m.trigger == "drain"]

    print(f"{name}: starting the cluster", flush=True)
    with_cluster(cfg, body)
    return run


def as_json(message: Any) -> str:
    from google.protobuf.json_format import MessageToJson

    return MessageToJson(message, preserving_proto_field_name=True)


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def summarize(run: Run, slo_ttft: float, slo_tpot: float, static_instances: int) -> dict[str, Any]:
    reqs = run.requests
    ok = [r for r in reqs if r.ok]
    failed = [r for r in reqs if not r.ok]
    meets = [r for r in ok if r.ttft is not None and r.ttft <= slo_ttft and (r.tpot or 0.0) <= slo_tpot]
    migrated = {m["request_id"] for m in run.drain_migrations}
    on_victims = [r for r in reqs if r.request_id in migrated]
    duration = run.samples[-1]["t"] if run.samples else 0.0
    instance_s = 0.0
    for a, b in itertools.pairwise(run.samples):
        alive = a.get("alive", {})
        instance_s += (alive.get("prefill", 0) + alive.get("decode", 0)) * (b["t"] - a["t"])
    return {
        "requests": len(reqs),
        "failed": len(failed),
        "failures": [f"{r.request_id or '?'}: {r.error}" for r in failed[:10]],
        "slo_attainment": len(meets) / len(reqs) if reqs else 0.0,
        "ttft_p99_s": p99([r.ttft for r in ok if r.ttft is not None]),
        "tpot_p99_s": p99([r.tpot for r in ok if r.tpot is not None]),
        "drain_migrations": len(run.drain_migrations),
        "drain_migrations_moved": sum(1 for m in run.drain_migrations if m.get("outcome") == "moved"),
        "requests_moved_by_scale_in": len(on_victims),
        "requests_moved_by_scale_in_failed": sum(1 for r in on_victims if not r.ok),
        "largest_gap_of_a_moved_request_s": max((r.max_gap for r in on_victims), default=None),
        "largest_gap_any_request_s": max((r.max_gap for r in ok), default=None),
        "duration_s": duration,
        "instance_seconds": instance_s,
        "static_instance_seconds": static_instances * duration,
        "decisions": [
            f"{d.get('reason')}: {d.get('prefill', 0)}P+{d.get('decode', 0)}D; "
            + "; ".join(d.get("actions", []))
            for d in reversed(run.decisions)
        ],
    }


def plot(runs: list[Run], path: Path, slo_ttft: float, slo_tpot: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    auto = runs[0]
    t = [s["t"] for s in auto.samples]
    ax = axes[0]
    ax.plot(t, [s["offered_tps"] for s in auto.samples], "k--", label="offered (output tok/s)")
    for run, style in zip(runs, ("tab:blue", "tab:gray"), strict=False):
        ax.plot(
            [s["t"] for s in run.samples],
            [s.get("decode_tps", 0) for s in run.samples],
            color=style,
            label=f"decode tok/s ({run.name})",
        )
    ax.set_ylabel("tokens/s")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[1]
    for role, color in (("decode", "tab:blue"), ("prefill", "tab:orange")):
        ax.step(
            t,
            [s.get(role, {}).get("desired", 0) for s in auto.samples],
            where="post",
            color=color,
            linestyle="--",
            label=f"desired {role[0].upper()}",
        )
        ax.step(
            t,
            [s.get(role, {}).get("ready", 0) for s in auto.samples],
            where="post",
            color=color,
            label=f"ready {role[0].upper()}",
        )
    ax.set_ylabel("instances (autoscaled)")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[2]
    for run, color in zip(runs, ("tab:blue", "tab:gray"), strict=False):
        for what, style in (("ttft", "-"), ("tpot", ":")):
            xs, ys = _rolling_p99(run.requests, what)
            ax.plot(xs, ys, color=color, linestyle=style, label=f"{what.upper()} p99 ({run.name})")
        ax.axhline(slo_ttft, color="red", linewidth=0.5)
        ax.axhline(slo_tpot, color="red", linewidth=0.5, linestyle=":")
    ax.set_yscale("log")
    ax.set_ylabel("seconds (30 s windows)")
    ax.set_xlabel("seconds")
    ax.legend(loc="upper right", fontsize=8)
    fig.suptitle("pdflow autoscaling on real vLLM CPU engines (SmolLM2-135M)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _rolling_p99(reqs: list[Req], what: str, window: float = 30.0) -> tuple[list[float], list[float]]:
    done = sorted((r.sent, getattr(r, what)) for r in reqs if r.ok and getattr(r, what) is not None)
    if not done:
        return [], []
    xs, ys, end = [], [], done[-1][0]
    t = window
    while t <= end + window:
        values = [v for s, v in done if t - window <= s < t]
        if (value := p99(values)) is not None:
            xs.append(t)
            ys.append(value)
        t += window / 3
    return xs, ys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target-tps", type=float, help="autoscaler.target_decode_tps (default: calibrate)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="stretch (>1) or shrink the profile")
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--max-output", type=int, default=96)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-static", action="store_true", help="skip the static 1P+3D run")
    parser.add_argument("--slo-ttft", type=float, default=2.0)
    parser.add_argument("--slo-tpot", type=float, default=0.2)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "autoscaling.json")
    parser.add_argument("--png", type=Path, default=ROOT / "results" / "autoscaling.png")
    args = parser.parse_args()

    target = args.target_tps
    if target is None:
        saturated = calibrate(args.max_prompt, args.max_output)
        target = saturated / 3
        print(f"one decode engine, saturated: {saturated:.1f} tok/s; target_decode_tps = {target:.1f}")
    autoscaler = {
        "autoscaler.enabled": True,
        "autoscaler.target_decode_tps": target,
        "autoscaler.target_prefill_tps": 1e9,  # one prefill engine keeps up here: the shape alone sizes P
        "autoscaler.shape": "1:3",
        "autoscaler.interval_s": 3.0,
        "autoscaler.out_ticks": 2,
        "autoscaler.in_ticks": 8,
        "autoscaler.warm_s": 20.0,
        "autoscaler.min_prefill": 1,
        "autoscaler.max_prefill": 1,
        "autoscaler.min_decode": 1,
        "autoscaler.max_decode": 3,
        "autoscaler.max_instances": 4,
        "autoscaler.ttft_slo_s": args.slo_ttft,
        "autoscaler.tpot_slo_s": args.slo_tpot,
    }
    runs = []
    reqs = _schedule(target, args.time_scale, args.seed, args.max_prompt, args.max_output)
    print(f"{len(reqs)} requests over {PROFILE[-1][0] * args.time_scale:.0f} s", flush=True)
    cfg = cluster_config({"prefill.replicas": 1, "decode.replicas": 1, **autoscaler})
    runs.append(run_once("autoscaled", cfg, reqs, args.seed, target, args.time_scale))
    if not args.no_static:
        reqs = _schedule(target, args.time_scale, args.seed, args.max_prompt, args.max_output)
        cfg = cluster_config({"prefill.replicas": 1, "decode.replicas": 3})
        runs.append(run_once("static 1P+3D", cfg, reqs, args.seed, target, args.time_scale))
    summaries = {run.name: summarize(run, args.slo_ttft, args.slo_tpot, 4) for run in runs}
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"autoscaling: target {target:.1f} decode tok/s per instance, peak 3x")
    table.add_column("figure")
    for run in runs:
        table.add_column(run.name, justify="right")
    rows = (
        ("requests (failed)", lambda s: f"{s['requests']} ({s['failed']})"),
        ("SLO attainment", lambda s: f"{s['slo_attainment']:.1%}"),
        ("TTFT p99", lambda s: _ms(s["ttft_p99_s"])),
        ("TPOT p99", lambda s: _ms(s["tpot_p99_s"])),
        ("instance-seconds", lambda s: f"{s['instance_seconds']:.0f}"),
        ("static peak allocation", lambda s: f"{s['static_instance_seconds']:.0f}"),
        ("scale-in migrations (moved)", lambda s: f"{s['drain_migrations']} ({s['drain_migrations_moved']})"),
        (
            "requests moved by scale-in (failed)",
            lambda s: f"{s['requests_moved_by_scale_in']} ({s['requests_moved_by_scale_in_failed']})",
        ),
        ("largest gap, moved request", lambda s: _ms(s["largest_gap_of_a_moved_request_s"])),
        ("largest gap, any request", lambda s: _ms(s["largest_gap_any_request_s"])),
    )
    for label, fmt in rows:
        table.add_row(label, *(fmt(summaries[run.name]) for run in runs))
    Console().print(table)
    for line in summaries["autoscaled"]["decisions"]:
        print("  " + line)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "target_decode_tps": target,
                "profile": PROFILE,
                "time_scale": args.time_scale,
                "summaries": summaries,
                "runs": {
                    r.name: {
                        "samples": r.samples,
                        "requests": [asdict(q) for q in r.requests],
                        "decisions": r.decisions,
                        "drain_migrations": r.drain_migrations,
                    }
                    for r in runs
                },
            },
            indent=1,
        )
    )
    plot(runs, args.png, args.slo_ttft, args.slo_tpot)
    print(f"wrote {args.output} and {args.png}")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


if __name__ == "__main__":
    main()
