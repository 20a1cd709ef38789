"""Live migration downtime on real engines: two vLLM CPU decode workers (SmolLM2) in this process, one greedy
request per run moved from A to B once its sequence reaches 256, 1024, 4096 or 8144 tokens (SmolLM2 has 8192
positions), by live pre-copy, blocking stop-and-copy and recompute. A second request keeps decoding on A
throughout, so that the source's time per token during the migration can be compared with before it; another
keeps decoding on B, so that both engines share the cores before the migration as after it.

Downtime is what the migrated request's client sees: the largest gap between two of its tokens from the
migration's start to the first token after the hand-over, minus its median gap before the migration. The
source's time per token is shown for the median run and, pooled over all runs, as a growth (one run's
migration window holds only a few of the companion's tokens).

    .venv/bin/python benchmarks/migration.py [--lengths 256,1024,4096,8144] [--modes live,recompute]
        [--repeats 3] [--idle-destination] [--copy-push] [--pin]

Prints a table and writes ``results/migration.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TAIL = 48  # tokens generated after the migration starts (and before, to learn the normal gap)


async def _companion(
    worker: Any,
    prompt: tuple[int, ...],
    stop: asyncio.Event,
    gaps: list[tuple[float, float]],
    restarts: list[int] | None = None,
) -> None:
    """Keep one request decoding on the source; record (time, gap) of each token. It starts over whenever
    ``restarts[0]`` changes (before each run), so that its own sequence, whose attention every step pays
    for, has about the same length in every cell rather than growing over the whole benchmark."""
    from protocol.messages import SamplingSpec

    n, restarts = 0, restarts if restarts is not None else [0]
    while not stop.is_set():
        n += 1
        generation = restarts[0]
        sampling = SamplingSpec(max_tokens=4000, temperature=0.0, ignore_eos=True)
        last = time.monotonic()
        async for chunk in worker.generate(f"companion-{worker.instance_id}-{n}", prompt, sampling):
            now = time.monotonic()
            if chunk.token_ids:
                gaps.append((now, now - last))
                last = now
            if stop.is_set() or restarts[0] != generation:
                break


async def _one(workers: list[Any], length: int, mode: str, run: int) -> dict[str, Any]:
    from protocol.messages import Handover, MigrationTarget, SamplingSpec

    source, dest = workers
    before = TAIL
    prompt = tuple(1000 + (i * 7919 + run) % 20000 for i in range(length - before))
    sampling = SamplingSpec(max_tokens=before + TAIL, temperature=0.0, ignore_eos=True)
    times: list[float] = []
    stream = source.generate(f"mig-{run}", prompt, sampling)
    migrating: asyncio.Task[Any] | None = None
    started = moved_at = None
    handed_at_token = None
    handover_at = None  # when the client got the hand-over, and how many tokens it had then
    while True:
        try:
            chunk = await stream.__anext__()
        except StopAsyncIteration:
            break
        if isinstance(chunk, Handover):
            handover_at = (time.monotonic(), len(times))
            stream = dest.decode(chunk.continuation)
            continue
        for _ in chunk.token_ids:
            times.append(time.monotonic())
        if migrating is None and len(times) >= before:
            target = MigrationTarget(dest.instance_id, dest.actor_name, dest.engine.kv_endpoint)
            started = time.monotonic()
            migrating = asyncio.create_task(source.migrate(f"mig-{run}", f"b{run}", target, mode))
        if migrating is not None and migrating.done() and moved_at is None:
            moved_at = time.monotonic()
            handed_at_token = len(times)
        if chunk.finish_reason is not None:
            break
    assert migrating is not None and started is not None
    report = await migrating
    gaps = [b - a for a, b in itertools.pairwise(times)]
    normal = statistics.median(gaps[: before - 2])
    first_after = next(i for i, t in enumerate(times) if t > started)
    window = [
        times[i] - times[i - 1]
        for i in range(first_after, min(len(times), (handed_at_token or len(times)) + 2))
    ]
    # the hand-over gap split: the source's part (last token from it to the hand-over) and the
    # destination's (hand-over to its first token)
    split = (float("nan"), float("nan"))
    others = window  # the gaps before the hand-over's (the pre-copy's, while the source still serves)
    if handover_at is not None and 0 < handover_at[1] < len(times):
        at, n = handover_at
        split = ((at - times[n - 1]) * 1e3, (times[n] - at) * 1e3)
        others = [times[i] - times[i - 1] for i in range(first_after, n)]
    return {
        "length": length,
        "mode": mode,
        "outcome": report.outcome.value,
        "error": report.error,
        "normal_gap_ms": normal * 1e3,
        "max_gap_ms": max(window) * 1e3,
        "downtime_ms": (max(window) - normal) * 1e3,
        "paused_ms": report.paused_s * 1e3,
        "handover_source_ms": split[0],
        "handover_dest_ms": split[1],
        "precopy_max_gap_ms": max(others, default=float("nan")) * 1e3,
        "migration_ms": report.duration_s * 1e3,
        "stages": report.stages,
        "wire_mb": report.wire_bytes / 1e6,
        "tokens_moved": report.tokens,
        "primed_blocks": report.primed_blocks,
        # the source's own TPOT is compared over the migration against the decode phase before it (once
        # the migrated request's prompt was computed)
        "window": (started, started + report.duration_s, times[8]),
    }


def _median_row(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median downtime, with every run's downtime alongside."""
    ordered = sorted(tries, key=lambda r: r["downtime_ms"])
    row = dict(ordered[len(ordered) // 2])
    row["downtimes_ms"] = [round(r["downtime_ms"], 1) for r in tries]
    for key in ("handover_source_ms", "handover_dest_ms", "precopy_max_gap_ms", "normal_gap_ms"):
        row[key.replace("_ms", "_runs_ms")] = [round(r[key], 1) for r in tries]
    for key in ("source_tpot_before_ms", "source_tpot_during_ms"):
        row[key.replace("_ms", "_runs_ms")] = [round(r[key], 1) for r in tries]
    finite = [r for r in tries if r["source_tpot_during_ms"] == r["source_tpot_during_ms"]]
    if finite:  # every run's tokens, pooled: one run's migration window holds only a few of them
        row["source_tpot_growth"] = (
            statistics.mean(r["source_tpot_during_ms"] for r in finite)
            / (statistics.mean(r["source_tpot_before_ms"] for r in finite))
            - 1
        )
    row["outcomes"] = [r["outcome"] for r in tries]
    return row


async def _main(args: argparse.Namespace) -> list[dict[str, Any]]:
    from decode_worker.actor import DecodeWorker
    from pdctl.model_cache import prepare_model
    from protocol.config import ClusterConfig

    model = prepare_model()
    lengths = [int(x) for x in args.lengths.split(",")]
    cfg = ClusterConfig.load(
        # SmolLM2 has 8192 positions: the longest sequence may take 8192 - TAIL tokens (--lengths ...,8144)
        overrides={
            "engine.max_model_len": min(max(lengths) + 256, 8192),
            # the destination primes its prefix cache with the pre-copied stages (migration.prime_destination;
            # --set migration.prime_destination=false to compare); every run's prompt is its own
            "engine.prefix_caching": True,
            "kv.zero_copy": not args.copy_push,
            **dict(kv.split("=", 1) for kv in args.set),
        }
    ).model_dump(mode="json")
    workers = [DecodeWorker(f"decode-{c}", f"bench-{c}", str(model), cfg, "", "pdflow") for c in "AB"]
    for w in workers:  # no Ray here: a migration reaches the other worker in this process
        w.local_peers = {peer.actor_name: peer for peer in workers if peer is not w}
    for core, w in enumerate(workers):
        if args.pin:  # the engine's compute thread, and every thread it starts later, on a core of its own
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(core % (os.cpu_count() or 1))
        await w.start()
    rows = []
    try:
        companion_gaps: list[tuple[float, float]] = []
        stop = asyncio.Event()
        restarts = [0]
        companion = asyncio.create_task(
            _companion(workers[0], tuple(range(500, 756)), stop, companion_gaps, restarts)
        )
        # The destination decodes a request of its own too, so that both engines share the machine's cores
        # before the migration as after it: the source's time per token then shows what the migration costs
        # it, not the destination starting to compute next to it on the same cores.
        busy = asyncio.create_task(
            _companion(workers[1], tuple(range(800, 1056)), stop, [], restarts)
            if not args.idle_destination
            else stop.wait()
        )
        await asyncio.sleep(3)
        # The first migration between two engines also sets up their NIXL connection (UCX endpoints, both
        # ways); that one-time cost is reported on its own, not in the cells.
        first = await _one(workers, lengths[0], "live", 0)
        first.pop("window")
        rows.append({**first, "mode": "first (connection set-up)"})
        print(f"first migration (sets up the connection): {first['downtime_ms']:.1f} ms", flush=True)
        await asyncio.sleep(0.5)
        # Lengths and modes take turns, run after run, so that every cell sees the machine alike (a slow
        # spell does not land on one cell's runs only).
        cells = [(length, mode) for length in lengths for mode in args.modes.split(",")]
        tries: dict[tuple[int, str], list[dict[str, Any]]] = {cell: [] for cell in cells}
        run = 0
        for repeat in range(args.repeats):
            for length, mode in cells:
                run += 1
                restarts[0] += 1
                row = await _one(workers, length, mode, run)
                lo, hi, calm = row.pop("window")
                during = [g for t, g in companion_gaps if lo <= t <= hi + 0.05]
                baseline = [g for t, g in companion_gaps if calm <= t < lo]
                row["source_tpot_before_ms"] = statistics.mean(baseline) * 1e3 if baseline else float("nan")
                row["source_tpot_during_ms"] = statistics.mean(during) * 1e3 if during else float("nan")
                tries[(length, mode)].append(row)
                print(
                    f"  run {repeat + 1}/{args.repeats} {length:>5} {mode:<13} downtime "
                    f"{row['downtime_ms']:7.1f} ms ({row['outcome']}; hand-over gap "
                    f"{row['handover_source_ms']:.0f} + {row['handover_dest_ms']:.0f} ms, "
                    f"pre-copy's largest gap {row['precopy_max_gap_ms']:.0f} ms, "
                    f"normal {row['normal_gap_ms']:.0f} ms)",
                    flush=True,
                )
                await asyncio.sleep(0.5)
        for cell in cells:
            row = _median_row(tries[cell])
            rows.append(row)
            print(_line(row), flush=True)
        stop.set()
        await asyncio.wait_for(asyncio.gather(companion, busy), 60)
    finally:
        for w in workers:
            await w.shutdown()
    return rows


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['length']:>6} {r['mode']:<14} {r['outcome']:<8} downtime {r['downtime_ms']:8.1f} ms "
        f"(max gap {r['max_gap_ms']:7.1f}, normal {r['normal_gap_ms']:6.1f}) paused {r['paused_ms']:7.1f} ms "
        f"(gap: source {r['handover_source_ms']:6.1f} + destination {r['handover_dest_ms']:6.1f} ms) "
        f"stages {r['stages']} (primed {r['primed_blocks']} blocks) {r['wire_mb']:6.1f} MB  "
        f"source TPOT {r['source_tpot_before_ms']:6.1f} -> "
        f"{r['source_tpot_during_ms']:6.1f} ms "
        f"(all runs {100 * r.get('source_tpot_growth', float('nan')):+.0f}%)"
        f"  runs {r.get('downtimes_ms', '')} {r['error']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="256,1024,4096,8144")
    parser.add_argument("--modes", default="live,stop_and_copy,recompute")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per cell; the median is reported.")
    parser.add_argument(
        "--idle-destination",
        action="store_true",
        help="No request of its own on the destination (then it competes with the source for the cores only "
        "once the moved request runs there)",
    )
    parser.add_argument(
        "--copy-push",
        action="store_true",
        help="Pushes copy the blocks into staging first (kv.zero_copy off), as before zero-copy",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="Bind the source engine to core 0 and the destination's to core 1, as on two machines: the "
        "destination's work then no longer slows the source through the shared cores",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="A config override, as pdctl up --set (e.g. migration.overlap_last_push=false)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "migration.json")
    args = parser.parse_args()
    from pdctl.local_cluster import apply_env_defaults
    from pdctl.model_cache import default_cache_dir

    apply_env_defaults(default_cache_dir())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print("length mode           outcome  downtime", flush=True)
    rows = asyncio.run(_main(args))
    by = {(r["length"], r["mode"]): r for r in rows}
    summary: dict[str, Any] = {}
    lengths = sorted({r["length"] for r in rows})
    if ("live" in args.modes) and len(lengths) > 1:
        lo, hi = by.get((lengths[0], "live")), by.get((lengths[-1], "live"))
        rec = by.get((lengths[-1], "recompute"))
        if lo and hi:
            summary["live_downtime_ratio_longest_vs_shortest"] = hi["downtime_ms"] / max(
                lo["downtime_ms"], 1e-3
            )
        if hi and rec:
            summary["recompute_vs_live_downtime_longest"] = rec["downtime_ms"] / max(hi["downtime_ms"], 1e-3)
    for key, value in summary.items():
        print(f"{key}: {value:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
