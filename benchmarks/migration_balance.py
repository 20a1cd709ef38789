"""The migration policy against skewed dispatch, on real engines: a 1P+2D cluster where every request of a
burst lands on decode-0 (decode-1 is cordoned while they are placed, then uncordoned, as when a worker has
just joined), run once with ``migration.auto`` off and once on. Prints p50/p99 time per output token and the
migrations the policy made, and writes ``results/migration_balance.json``.

By default the burst is twice what one decode engine runs at once (``engine.max_num_seqs``), so on decode-0
half of it queues behind the other half, as on a GPU whose batch or KV memory is full. With
``--max-num-seqs`` at or above ``--requests`` nothing queues and only the engines' speed is at stake: on a
2-core laptop two engines share the same cores, so splitting a batch between them gains nothing there.
``--kv-blocks`` shrinks each engine's KV cache instead, so that the burst outgrows decode-0's memory and vLLM
preempts (and recomputes) requests there unless the policy moves some away.

    .venv/bin/python benchmarks/migration_balance.py [--requests 12] [--max-num-seqs 6] [--max-tokens 256]
        [--pairs 1]   # off/on runs, alternately; the summary pools every request of each mode
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def _stream(stub: Any, model: str, prompt: list[int], max_tokens: int) -> list[float]:
    from protocol.proto import router_pb2

    request = router_pb2.GenerateRequest(
        model=model,
        prompt_token_ids=router_pb2.TokenIds(ids=prompt),
        sampling=router_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )
    times = []
    async for resp in stub.Generate(request, timeout=900):
        times.extend([time.monotonic()] * len(resp.token_ids))
    return times


async def _burst(grpc_address: str, model: str, args: argparse.Namespace, admin: Any) -> list[list[float]]:
    import grpc

    from protocol.proto import router_pb2_grpc

    async with grpc.aio.insecure_channel(grpc_address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        prompts = [
            [1000 + (i * 31 + j) % 5000 for j in range(args.prompt_tokens)] for i in range(args.requests)
        ]
        tasks = [asyncio.create_task(_stream(stub, model, p, args.max_tokens)) for p in prompts]
        await asyncio.sleep(args.skew_s)  # every request is placed (on decode-0) by now
        admin.uncordon("decode-1")
        return await asyncio.gather(*tasks)


def _run(auto: bool, args: argparse.Namespace) -> dict[str, Any]:
    from pdctl.admin_client import AdminClient
    from pdctl.local_cluster import LocalCluster
    from pdctl.model_cache import prepare_model
    from protocol.config import ClusterConfig

    config = ClusterConfig.load(
        overrides={
            "decode.replicas": 2,
            "frontdoor.http_port": 0,
            "frontdoor.grpc_port": 0,
            "controller.admin_port": 0,
            "migration.auto": auto,
            "migration.cooldown_s": args.cooldown_s,
            "engine.max_num_seqs": args.max_num_seqs,
        }
        | ({"engine.kv_blocks": args.kv_blocks} if args.kv_blocks else {})
    )
    cluster = LocalCluster(config, prepare_model())
    cluster.start(say=lambda m: print(f"  {m}", flush=True))
    try:
        cluster.wait_until_serving()
        with AdminClient(cluster.handle.admin_address) as admin:
            admin.cordon("decode-1")
            time.sleep(1.0)  # the front doors get the snapshot
            times = asyncio.run(_burst(cluster.handle.grpc_address, config.model.name, args, admin))
            migrations = admin.migrations(200)
    finally:
        cluster.stop()
    tpots = sorted((t[-1] - t[0]) / (len(t) - 1) for t in times if len(t) > 1)
    moved = [m for m in migrations.recent if m.outcome == "moved"]
    routes = collections.Counter(f"{m.source}->{m.destination}" for m in moved)
    return {
        "auto": auto,
        "requests": len(times),
        "tokens": [len(t) for t in times],
        "tpots_ms": [t * 1e3 for t in tpots],
        "tpot_p50_ms": statistics.median(tpots) * 1e3,
        "tpot_p99_ms": _p99(tpots) * 1e3,
        "tpot_mean_ms": statistics.mean(tpots) * 1e3,
        "migrations_moved": len(moved),
        "migrations_other": len(migrations.recent) - len(moved),
        "routes": dict(routes),
        "mean_pause_ms": statistics.mean([m.paused_seconds for m in moved]) * 1e3 if moved else 0.0,
    }


def _p99(values: list[float]) -> float:
    """The 99th percentile, nearest rank (of a dozen requests: the slowest)."""
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, round(0.99 * (len(ranked) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--max-num-seqs", type=int, default=6, help="engine.max_num_seqs (batch cap).")
    parser.add_argument("--kv-blocks", type=int, help="engine.kv_blocks (default: from kv_cache_gib).")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--skew-s", type=float, default=2.0, help="Seconds decode-1 stays cordoned.")
    parser.add_argument("--cooldown-s", type=float, default=1.0, help="migration.cooldown_s for the run.")
    parser.add_argument(
        "--pairs", type=int, default=1, help="Runs of each mode, off and on alternately; pooled at the end."
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "migration_balance.json")
    args = parser.parse_args()
    rows = []
    for pair in range(args.pairs):
        for auto in (False, True):
            print(f"pair {pair + 1}/{args.pairs}, migration policy {'on' if auto else 'off'}:", flush=True)
            row = _run(auto, args)
            rows.append(row | {"pair": pair})
            print(
                f"  TPOT p50 {row['tpot_p50_ms']:.1f} ms, p99 {row['tpot_p99_ms']:.1f} ms, "
                f"mean {row['tpot_mean_ms']:.1f} ms; {row['migrations_moved']} moved "
                f"({row['migrations_other']} not) {row['routes']}, mean pause {row['mean_pause_ms']:.0f} ms",
                flush=True,
            )
    pooled = {
        auto: [t for row in rows if row["auto"] is auto for t in row["tpots_ms"]] for auto in (False, True)
    }
    lower = sum(on["tpot_p99_ms"] < off["tpot_p99_ms"] for off, on in zip(rows[::2], rows[1::2], strict=True))
    summary = {
        "pairs": args.pairs,
        "pairs_with_lower_p99": lower,
        **{
            f"{'on' if auto else 'off'}_{name}": value
            for auto, tpots in pooled.items()
            for name, value in (("p50_ms", statistics.median(tpots)), ("p99_ms", _p99(tpots)))
        },
    }
    print(
        f"pooled over {args.pairs} run(s) of {args.requests} requests each: TPOT p50 "
        f"{summary['off_p50_ms']:.1f} -> {summary['on_p50_ms']:.1f} ms, p99 {summary['off_p99_ms']:.1f} -> "
        f"{summary['on_p99_ms']:.1f} ms (off -> on); p99 lower with the policy in {lower} of "
        f"{args.pairs} pairs"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"rows": rows, "summary": summary, "args": vars(args) | {"out": str(args.out)}}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
