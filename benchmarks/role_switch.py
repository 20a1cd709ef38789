"""Role switching on real engines: a local cluster (Ray, vLLM CPU engines with SmolLM2) of 1P+2D with the
autoscaler on and a budget of three instances, so that a pool that needs more can only get it from the other.
The load has three phases: decode-heavy (short prompts, long answers: two decode instances' worth), then
prefill-heavy (long prompts, two-token answers: more prompt tokens/s than one prefill instance should carry),
then decode-heavy again. The policy should switch a decode worker to prefill in the second phase and a prefill
worker back to decode in the third, each drained first and switched in place (the engine keeps running).

Then it times what the switch saves: the pool is brought to 1P+1D and back to 1P+2D by hand, which starts a
new engine (a cold start), and that start is set against the switches.

It reports failed requests (target 0) per phase, each switch (how long from cordon to serving in the new role,
and the drain inside that), the cold start, TTFT and TPOT p99 per phase; it prints a table, writes JSON and a
PNG timeline (offered prompt and decode tokens/s, ready P and D, the switches).

    .venv/bin/python benchmarks/role_switch.py [--target-tps 28.6] [--target-prefill-tps 150]
        [--time-scale 1.0] [--output results/role_switch.json] [--png results/role_switch.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the autoscaling benchmark's client and cluster helpers (this script's folder is on the path too, after ROOT,
# which has no module of that name)
from autoscaling import Req, as_json, cluster_config, p99, send_one, with_cluster  # noqa: E402


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    prompt_tokens: int
    max_tokens: int
    decode_load: float  # offered output tokens/s, as a multiple of target_decode_tps
    prefill_load: float  # offered prompt tokens/s, as a multiple of target_prefill_tps


PHASES = (
    Phase("decode-heavy", 90, 64, 96, 1.6, 0.0),
    Phase("prefill-heavy", 180, 1200, 2, 0.0, 2.5),
    Phase("decode-heavy again", 180, 64, 96, 1.6, 0.0),
)
_SWITCH = re.compile(
    r"(\S+): (?:drained in ([\d.]+) s[^;]*|drained already); "
    r"(prefill|decode) -> (prefill|decode) in place in ([\d.]+) s"
)


def _schedule(target_d: float, target_p: float, scale: float, seed: int) -> list[tuple[str, Req]]:
    """Poisson arrivals, phase by phase, at the rate that gives the phase's offered load."""
    rng = random.Random(seed)
    reqs: list[tuple[str, Req]] = []
    start = 0.0
    for ph in PHASES:
        per_request = max(
            ph.decode_load * target_d / ph.max_tokens, ph.prefill_load * target_p / ph.prompt_tokens
        )
        t, end = start, start + ph.seconds * scale
        while (t := t + rng.expovariate(per_request)) < end:
            reqs.append((ph.name, Req(t, ph.prompt_tokens, ph.max_tokens)))
        start = end
    return reqs


async def _sample(admin: str, samples: list[dict[str, Any]], start: float, stop: asyncio.Event) -> None:
    from pdctl.admin_client import AdminClient, AdminUnavailable

    with AdminClient(admin) as client:
        while not stop.is_set():
            t = time.monotonic() - start
            try:
                st = await asyncio.to_thread(client.status)
                samples.append(
                    {
                        "t": t,
                        "instances": {i.instance_id: (i.role, i.state) for i in st.instances},
                        "decode_tps": sum(i.decode_tps for i in st.instances if i.role == "decode"),
                        "prompt_tps": sum(i.prompt_tps for i in st.instances if i.role == "prefill"),
                    }
                )
            except AdminUnavailable as exc:
                samples.append({"t": t, "error": str(exc)})
            await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - start - t)))


async def _drive(
    url: str, admin: str, reqs: list[tuple[str, Req]], seed: int
) -> tuple[list[dict[str, Any]], float]:
    """Send the load; returns the samples and when (unix seconds) the load's clock started."""
    import httpx
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pdctl.chat import served_model

    model = served_model(url)
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=None) as client:
        start, wall_start = time.monotonic(), time.time()
        sampler = asyncio.create_task(_sample(admin, samples, start, stop))
        with Progress(TextColumn("load"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
            task = bar.add_task("load", total=len(reqs))

            async def one(i: int, r: Req) -> None:
                await send_one(client, model, r, i, seed, start)
                bar.advance(task)

            await asyncio.gather(*(one(i, r) for i, (_, r) in enumerate(reqs)))
        stop.set()
        await sampler
    return samples, wall_start


def _cold_start(admin: str) -> dict[str, Any]:
    """1P+1D by hand (a drained decode worker removed), then 1P+2D: seconds until the new engine serves."""
    from pdctl.admin_client import AdminClient

    with AdminClient(admin) as client:
        client.scale(1, 1, 300)
        before = {i.instance_id for i in client.status().instances}
        t0 = time.monotonic()
        decision = client.scale(1, 2, 300)
        while time.monotonic() - t0 < 600:
            ready = [
                i.instance_id
                for i in client.status().instances
                if i.role == "decode" and i.state == "READY" and i.instance_id not in before
            ]
            if ready:
                return {
                    "instance": ready[0],
                    "seconds": time.monotonic() - t0,
                    "actions": list(decision.actions),
                }
            time.sleep(0.25)
    return {"instance": "", "seconds": None, "actions": list(decision.actions)}


def summarize(
    reqs: list[tuple[str, Req]], decisions: list[dict[str, Any]], wall_start: float
) -> dict[str, Any]:
    phases = {}
    for ph in PHASES:
        mine = [r for name, r in reqs if name == ph.name]
        ok = [r for r in mine if r.ok]
        phases[ph.name] = {
            "requests": len(mine),
            "failed": len(mine) - len(ok),
            "ttft_p99_s": p99([r.ttft for r in ok if r.ttft is not None]),
            "tpot_p99_s": p99([r.tpot for r in ok if r.tpot is not None]),
        }
    switches = []
    for d in reversed(decisions):  # oldest first
        for action in d.get("actions", []):
            if m := _SWITCH.search(action):
                switches.append(
                    {
                        "instance": m[1],
                        "drain_s": float(m[2]) if m[2] else 0.0,
                        "from": m[3],
                        "to": m[4],
                        "seconds": float(m[5]),  # from its drain's start to serving in the new role
                        "at": float(d.get("at", 0.0)) - wall_start,  # when decided, on the load's clock
                        "reason": d.get("reason"),
                        "manual": bool(d.get("manual")),
                    }
                )
    return {
        "requests": len(reqs),
        "failed": sum(1 for _, r in reqs if not r.ok),
        "failures": [f"{r.request_id or '?'}: {r.error}" for _, r in reqs if not r.ok][:10],
        "phases": phases,
        "switches": switches,
        "decisions": [
            f"{d.get('reason')}: {d.get('prefill', 0)}P+{d.get('decode', 0)}D; "
            + "; ".join(d.get("actions", []))
            for d in reversed(decisions)
        ],
    }


def plot(samples: list[dict[str, Any]], switches: list[dict[str, Any]], path: Path, scale: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    good = [s for s in samples if "instances" in s]
    t = [s["t"] for s in good]
    ax = axes[0]
    ax.plot(t, [s["prompt_tps"] for s in good], color="tab:orange", label="prompt tok/s (prefill pool)")
    ax.set_ylabel("prompt tokens/s")
    ax2 = ax.twinx()
    ax2.plot(t, [s["decode_tps"] for s in good], color="tab:blue", label="decode tok/s (decode pool)")
    ax2.set_ylabel("decode tokens/s")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    ax = axes[1]
    for role, color in (("prefill", "tab:orange"), ("decode", "tab:blue")):
        ready = [sum(1 for r, st in s["instances"].values() if r == role and st == "READY") for s in good]
        ax.step(t, ready, where="post", color=color, label=f"ready {role}")
    for sw in switches:
        ax.axvspan(sw["at"], sw["at"] + sw["seconds"], color="tab:green", alpha=0.3)
        ax.annotate(f"{sw['instance']} -> {sw['to']}\n{sw['seconds']:.1f} s", (sw["at"], 2.6), fontsize=7)
    edge = 0.0
    for ph in PHASES:
        edge += ph.seconds * scale
        for a in axes:
            a.axvline(edge, color="gray", linewidth=0.5)
    ax.set_ylim(0, 3)
    ax.set_ylabel("instances")
    ax.set_xlabel("seconds (green: a switch, cordon to serving in the new role)")
    ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("pdflow role switching in place on real vLLM CPU engines (SmolLM2-135M), budget 3")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target-tps", type=float, default=28.6, help="autoscaler.target_decode_tps")
    parser.add_argument(
        "--target-prefill-tps", type=float, default=150.0, help="autoscaler.target_prefill_tps"
    )
    parser.add_argument("--time-scale", type=float, default=1.0, help="stretch (>1) or shrink the phases")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "role_switch.json")
    parser.add_argument("--png", type=Path, default=ROOT / "results" / "role_switch.png")
    args = parser.parse_args()

    cfg = cluster_config(
        {
            "prefill.replicas": 1,
            "decode.replicas": 2,
            "autoscaler.enabled": True,
            "autoscaler.target_decode_tps": args.target_tps,
            "autoscaler.target_prefill_tps": args.target_prefill_tps,
            "autoscaler.shape": "1:2",
            "autoscaler.interval_s": 3.0,
            "autoscaler.out_ticks": 2,
            "autoscaler.in_ticks": 8,
            "autoscaler.warm_s": 20.0,
            "autoscaler.min_prefill": 1,
            "autoscaler.max_prefill": 2,
            "autoscaler.min_decode": 1,
            "autoscaler.max_decode": 2,
            "autoscaler.max_instances": 3,
        }
    )
    reqs = _schedule(args.target_tps, args.target_prefill_tps, args.time_scale, args.seed)
    print(f"{len(reqs)} requests over {sum(p.seconds for p in PHASES) * args.time_scale:.0f} s", flush=True)

    def body(handle: Any) -> dict[str, Any]:
        from pdctl.admin_client import AdminClient

        samples, wall_start = asyncio.run(_drive(handle.http_url, handle.admin_address, reqs, args.seed))
        with AdminClient(handle.admin_address) as client:
            decisions = [json.loads(as_json(d)) for d in client.autoscaler_decisions(200, True).decisions]
        result = summarize(reqs, decisions, wall_start)
        print("timing a cold start: 1P+1D, then 1P+2D by hand", flush=True)
        result["cold_start"] = _cold_start(handle.admin_address)
        result["samples"] = samples
        return result

    result = with_cluster(cfg, body)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="role switching under load (budget 3 instances)")
    table.add_column("phase")
    for col in ("requests", "failed", "TTFT p99", "TPOT p99"):
        table.add_column(col, justify="right")
    for name, ph in result["phases"].items():
        table.add_row(
            name, str(ph["requests"]), str(ph["failed"]), _ms(ph["ttft_p99_s"]), _ms(ph["tpot_p99_s"])
        )
    Console().print(table)
    for sw in result["switches"]:
        print(
            f"  switch {sw['instance']}: {sw['from']} -> {sw['to']} at {sw['at']:.0f} s"
            f" in {sw['seconds']:.1f} s (drain {sw['drain_s']:.1f} s; {sw['reason']})"
        )
    cold = result["cold_start"]
    print(
        f"  cold start of a new decode engine: {cold['seconds']:.1f} s"
        if cold["seconds"]
        else "  no cold start"
    )
    if result["switches"] and cold["seconds"]:
        slowest = max(s["seconds"] for s in result["switches"])
        print(f"  slowest switch / cold start: {slowest / cold['seconds']:.2f}")
    for line in result["decisions"]:
        print("  " + line)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                **result,
                "request_records": [(n, asdict(r)) for n, r in reqs],
                "phases_spec": [asdict(p) for p in PHASES],
            },
            indent=1,
        )
    )
    plot(result["samples"], result["switches"], args.png, args.time_scale)
    print(f"wrote {args.output} and {args.png}")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


if __name__ == "__main__":
    main()
