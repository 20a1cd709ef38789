"""Robustness of live migration on real engines: two vLLM CPU decode workers (SmolLM2) in this process, a
steady load of greedy requests on both, and N random migrations between them, a share of them disturbed at a
random moment: the source cancels the migration, the destination is unreachable (a refused reservation), the
destination loses the KV that landed (dropped just before the hand-over reaches it: it must recompute), or the
client goes away. At the end every request must have finished exactly once (a finish reason, or the
client's own cancel) with every token it was owed, and both workers must hold nothing: no KV block, no
request, no staging region, landed or reserved transfer, push or pending load (leak check).

    .venv/bin/python benchmarks/migration_chaos.py [--migrations 100] [--concurrency 6]

Prints the tally and writes ``results/migration_chaos.json``; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAULTS = ("none", "cancel_source", "bad_destination", "destination_loses_kv", "client_abort")


class Flight:
    def __init__(self, rid: str, max_tokens: int) -> None:
        self.rid = rid
        self.max_tokens = max_tokens
        self.tokens: list[int] = []
        self.finishes = 0
        self.worker = 0  # index of the worker it decodes on
        self.cancelled = False
        self.error = ""
        self.lose_kv = False  # drop the parts on the destination before following the next hand-over
        self.recomputed = 0
        # not a candidate for a migration: between a hand-over and its first chunk from the new worker (where
        # nobody serves it yet), or its client was cancelled (the cancellation may still be finishing)
        self.in_transit = False


async def _client(workers: list[Any], flight: Flight, prompt: tuple[int, ...]) -> None:
    from protocol.messages import Handover, SamplingSpec

    sampling = SamplingSpec(max_tokens=flight.max_tokens, temperature=0.0, ignore_eos=True)
    stream = workers[flight.worker].generate(flight.rid, prompt, sampling)
    try:
        while True:
            try:
                chunk = await stream.__anext__()
            except StopAsyncIteration:
                break
            if isinstance(chunk, Handover):
                flight.in_transit = True
                source, flight.worker = workers[flight.worker], 1 - flight.worker
                handle = chunk.continuation.kv_handle
                if flight.lose_kv and handle is not None:
                    flight.lose_kv = False
                    flight.recomputed += 1
                    ids = list(handle.transfer_ids)
                    await source.engine.drop_pushed(chunk.target.kv_endpoint, ids, "chaos")
                stream = workers[flight.worker].decode(chunk.continuation)
                continue
            flight.in_transit = False
            flight.tokens.extend(chunk.token_ids)
            if chunk.finish_reason is not None:
                flight.finishes += 1
    except asyncio.CancelledError:
        flight.cancelled = True
        raise
    except Exception as exc:
        flight.error = str(exc)
    finally:
        await stream.aclose()


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    from decode_worker.actor import DecodeWorker
    from pdctl.model_cache import prepare_model
    from protocol.config import ClusterConfig
    from protocol.messages import MigrationTarget

    rng = random.Random(args.seed)
    cfg = ClusterConfig.load(overrides={"migration.timeout_s": 20}).model_dump(mode="json")
    model = prepare_model()
    workers = [DecodeWorker(f"decode-{c}", f"chaos-{c}", str(model), cfg, "", "pdflow") for c in "AB"]
    for w in workers:
        await w.start()
    flights: list[Flight] = []
    clients: dict[str, asyncio.Task[None]] = {}
    tally: collections.Counter[str] = collections.Counter()
    unprovoked: list[str] = []  # why migrations with no fault injected failed
    started = time.monotonic()
    try:

        def launch() -> None:
            flight = Flight(f"chaos-{len(flights)}", rng.randint(48, 160))
            flight.worker = rng.randint(0, 1)
            prompt = tuple(rng.randint(1000, 20000) for _ in range(rng.randint(20, 700)))
            flights.append(flight)
            clients[flight.rid] = asyncio.create_task(_client(workers, flight, prompt))

        for _ in range(args.concurrency):
            launch()
        done_migrations = 0
        while done_migrations < args.migrations:
            for rid, task in list(clients.items()):
                if task.done():
                    del clients[rid]
                    launch()
            live = [
                f
                for f in flights
                if f.rid in clients and len(f.tokens) >= 1 and f.finishes == 0 and not f.in_transit
            ]
            if not live:
                await asyncio.sleep(0.05)
                continue
            flight = rng.choice(live)
            src, dst = workers[flight.worker], workers[1 - flight.worker]
            fault = rng.choice(FAULTS)
            endpoint = dst.engine.kv_endpoint if fault != "bad_destination" else "127.0.0.1:9"
            target = MigrationTarget(dst.instance_id, dst.actor_name, endpoint)
            mode = rng.choice(("live", "live", "stop_and_copy", "recompute"))
            flight.lose_kv = fault == "destination_loses_kv"
            migrate = asyncio.create_task(src.migrate(flight.rid, f"x{done_migrations}", target, mode))
            if fault in ("cancel_source", "client_abort"):
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                if fault == "cancel_source":
                    src.cancel_migration(flight.rid)
                else:
                    flight.in_transit = True  # for good: its relay may wait for a last push before it ends
                    clients[flight.rid].cancel()
            report = await migrate
            tally[f"{fault}/{report.outcome.value}"] += 1
            if fault == "none" and report.outcome.value == "failed":
                unprovoked.append(report.error)
            done_migrations += 1
            if done_migrations % 10 == 0:
                print(f"  {done_migrations} migrations: {dict(sorted(tally.items()))}", flush=True)
        await asyncio.gather(*clients.values(), return_exceptions=True)
    finally:
        # Dropped parts free at once; a lost drop frees when its lease ends (kv.lease_seconds).
        deadline = time.monotonic() + cfg["kv"]["lease_seconds"] + 5
        while True:
            await asyncio.sleep(0.5)
            leaks = {w.instance_id: await w.leak_check() for w in workers}
            if not any(v for held in leaks.values() for v in held.values()) or time.monotonic() > deadline:
                break
        for w in workers:
            await w.shutdown()
    problems = []
    for f in flights:
        if f.cancelled:
            if f.finishes > 1:
                problems.append(f"{f.rid}: cancelled, yet finished {f.finishes} times")
        elif f.error or f.finishes != 1 or len(f.tokens) != f.max_tokens:
            problems.append(
                f"{f.rid}: finished {f.finishes}x, {len(f.tokens)}/{f.max_tokens} tokens {f.error}"
            )
    for iid, held in leaks.items():
        if any(held.values()):
            problems.append(f"{iid} still holds {held}")
    return {
        "migrations": args.migrations,
        "requests": len(flights),
        "cancelled_by_client": sum(f.cancelled for f in flights),
        "recomputed_after_kv_loss": sum(f.recomputed for f in flights),
        "outcomes": dict(sorted(tally.items())),
        "leaks": leaks,
        "problems": problems,
        "unprovoked_failures": unprovoked,
        "seconds": time.monotonic() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--migrations", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "migration_chaos.json")
    args = parser.parse_args()
    from pdctl.local_cluster import apply_env_defaults
    from pdctl.model_cache import default_cache_dir

    apply_env_defaults(default_cache_dir())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = asyncio.run(_main(args))
    print(json.dumps({k: v for k, v in result.items() if k != "leaks"}, indent=2))
    print("leak check:", result["leaks"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    if result["problems"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
