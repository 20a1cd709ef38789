"""Chaos: faults at every stage of a request, for every victim, on a real 2P+2D cluster (vLLM CPU engines,
SmolLM2) under a steady load; what its clients get. Prints a table and writes JSON; exits 1 if a goal fails.

    .venv/bin/python benchmarks/chaos.py [--rounds 1] [--rate 0.4] [--json results/chaos.json]

A Poisson load of greedy requests (prompts of 160-800 random token ids, 16-40 output tokens, every token
forced) runs throughout, as ``pdctl up`` would serve it: a supervisor restarts the controller or the front
door when its actor is gone (``LocalCluster.supervise``). Each trial sends a target request and three
bystanders, waits until the target reaches a stage, and strikes its victim:

- stages: queued (behind a long prefill on every prefill worker), prefilling, transferring (on the decode
  worker, before its first token there), decoding, a live migration's pre-copy, its freeze, and after the
  hand-over (the destination runs it);
- victims: the prefill worker, the decode worker (the migration's source), the migration's destination,
  the controller and the front door; and a scale-down of the decode pool under load (a drain);
- faults: ``kill`` (Ray kills the actor), ``core`` (SIGKILL of the vLLM engine core) and ``stop`` (SIGSTOP of
  the process tree for ``--stop-s``); a killed worker is started again under the same name.

Every request's greedy tokens are checked against a colocated reference engine: the same tokens, or (a stream
resumed on another worker by recompute) the same up to a cut and then the reference's continuation of prompt
plus tokens so far. At the end, nothing may be held: KV blocks, requests, staging regions, transfers, pulls,
pushes, streams, migrations (the workers' leak checks, the front door's and the controller's).

Goals (issue 27): 0 hung requests, 0 wrong tokens, every failure typed, >= 99% of requests that met a
recoverable fault (any but the front door's) complete, nothing held.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chaos_parts import (  # noqa: E402
    CLIENT_DEADLINE_S,
    Call,
    check_tokens,
    holder,
    inject,
    migration_phase,
    run_call,
    wait_for,
)
from chaos_report import report  # noqa: E402

from pdctl.bench import synthesize_prompt  # noqa: E402
from pdctl.local_cluster import (  # noqa: E402
    CONTROLLER_NAME,
    FRONTDOOR_NAME,
    NAMESPACE,
    LocalCluster,
    apply_env_defaults,
    free_port,
)
from pdctl.model_cache import default_cache_dir, prepare_model  # noqa: E402
from protocol.config import ClusterConfig  # noqa: E402
from protocol.snapshots import Role  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 160)

STAGES = {
    "prefill": ("queued", "prefilling", "transferring"),
    "decode source": ("transferring", "decoding", "precopy", "frozen", "after hand-over"),
    "decode destination": ("precopy", "frozen", "after hand-over"),
    "controller": ("decoding", "precopy"),
    "front door": ("decoding",),
    "scale-down": ("decoding",),
    "restart under the same name": ("decoding",),
}
FAULTS = {
    "prefill": ("kill", "core", "stop"),
    "decode source": ("kill", "core", "stop"),
    "decode destination": ("kill", "core", "stop"),
    "controller": ("kill", "stop"),
    "front door": ("kill", "stop"),
    "scale-down": ("drain",),
    "restart under the same name": ("restart",),
}
UNRECOVERABLE = ("front door",)  # its clients' connections die with it
PROMPT_LENGTHS = (160, 320, 480, 640, 800)
MAX_OUTPUT = 40
TARGET_PROMPT = 4  # an 800-token prompt: a prefill long enough to strike


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=1, help="trials per (victim, stage, fault)")
    p.add_argument("--rate", type=float, default=0.4, help="background load, requests per second")
    p.add_argument("--stop-s", type=float, default=20.0, help="how long a SIGSTOP lasts")
    p.add_argument("--prompts", type=int, default=15, help="distinct prompts (each has a reference run)")
    p.add_argument(
        "--only",
        default="",
        help="comma-separated parts of the trials' labels to run, such as 'controller' or 'decoding / stop' "
        "(a label is 'victim / stage / fault'; default: all)",
    )
    p.add_argument("--seed", type=int, default=27)
    p.add_argument("--json", type=Path, default=ROOT / "results" / "chaos.json")
    return p.parse_args()


class Chaos:
    def __init__(self, cluster: LocalCluster, reference: Any, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.handle = cluster.handle
        self.reference = reference
        self.args = args
        self.rng = random.Random(args.seed)
        self.prompts = [
            synthesize_prompt(PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)], index=i, seed=args.seed)
            for i in range(args.prompts)
        ]
        self.references: list[list[int]] = []
        self.calls: list[Call] = []
        self.trials: list[dict[str, Any]] = []
        self.restarts: list[tuple[float, str]] = []
        self._futures: list[Future[Call]] = []
        self._pool = ThreadPoolExecutor(96)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._handles: dict[str, Any] = {}

    # ---- clients ----

    def send(self, kind: str, prompt: int | None = None, max_tokens: int | None = None) -> Call:
        prompt = self.rng.randrange(len(self.prompts)) if prompt is None else prompt
        max_tokens = self.rng.randint(16, MAX_OUTPUT) if max_tokens is None else max_tokens
        call = Call(f"chaos-{next(self._ids)}", prompt, max_tokens, time.monotonic(), kind)
        with self._lock:
            self.calls.append(call)
            self._futures.append(
                self._pool.submit(run_call, self.handle.grpc_address, call, self.prompts[prompt])
            )
        return call

    def load(self) -> None:
        while not self._stop.wait(self.rng.expovariate(self.args.rate)):
            self.send("load")

    def supervise(self) -> None:
        """What ``pdctl up`` does every second."""
        while not self._stop.wait(1.0):
            try:
                for name in self.cluster.supervise():
                    self.restarts.append((time.monotonic(), name))
                    console.print(f"  supervisor: {name} was gone, restarted it")
            except Exception as exc:
                console.print(f"  supervisor failed: {exc}")

    # ---- the cluster ----

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.handle.http_url}/health", timeout=5).json())

    def wait_serving(self, deadline_s: float = 300.0) -> bool:
        def serving() -> bool:
            h = self.health()
            return bool(h["ok"]) and h["prefill_workers"] >= 2 and h["decode_workers"] >= 2

        return bool(wait_for(serving, deadline_s, poll_s=0.2))

    def workers(self, role: Role) -> dict[str, Any]:
        """The live workers of ``role`` by actor name, as the controller knows them (the ones it started to
        replace dead ones included)."""
        import ray

        from pdctl.admin_client import AdminClient

        with AdminClient(self.handle.admin_address) as admin:
            listed = admin.instances(role.value).instances
        found = {}
        for inst in listed:
            if inst.state == "READY":
                name = f"pdflow-{inst.instance_id}"
                if name not in self._handles:
                    self._handles[name] = ray.get_actor(name, namespace=NAMESPACE)
                found[name] = self._handles[name]
        return found

    def restart_under_the_same_name(self, name: str) -> None:
        """Start worker ``name`` again at once, under its name, as a kubelet restarts a crashed container:
        it reports STARTING at once, so the controller does not remove it as the dead one."""
        import ray

        role = Role.PREFILL if name.startswith("pdflow-prefill-") else Role.DECODE
        self._handles.pop(name, None)
        self.handle.actors.pop(name, None)
        deadline = time.monotonic() + 60
        while True:
            try:
                _, actor = self.cluster.add_worker(role, int(name.rsplit("-", 1)[1]))
                break
            except ValueError:  # Ray has not freed the dead actor's name yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        ray.get(actor.start.remote(), timeout=self.handle.config.worker.start_timeout_s)

    # ---- trials ----

    def trial(self, victim: str, stage: str, fault: str) -> None:
        import ray

        label = f"{victim} / {stage} / {fault}"
        record: dict[str, Any] = {"victim": victim, "stage": stage, "fault": fault, "reached": False}
        self.trials.append(record)
        if not self.wait_serving():
            record["note"] = "the cluster was not serving 2P+2D before the trial"
            return
        blockers = []
        if stage == "queued":  # a long prefill on every prefill worker: the target waits behind one
            from protocol.ids import RequestId
            from protocol.messages import PrefillRequest, SamplingSpec

            for name, actor in self.workers(Role.PREFILL).items():
                ids = tuple(synthesize_prompt(1800, index=next(self._ids), seed=99))
                blockers.append(
                    actor.prefill.remote(
                        PrefillRequest(
                            RequestId(f"block-{name}-{time.monotonic()}"),
                            ids,
                            SamplingSpec(max_tokens=1),
                            hand_off=False,
                        )
                    )
                )
            time.sleep(0.3)  # the blockers reach their engines first
        target = self.send("target", TARGET_PROMPT, MAX_OUTPUT)
        bystanders = [self.send("bystander") for _ in range(3)]
        try:
            hit, name = self.reach(stage, victim, target)
        except Exception as exc:  # a worker the trial looked at died meanwhile (an earlier fault's wake)
            hit, name = None, f"{type(exc).__name__}: {exc}"
        if hit is None:
            record["note"] = f"missed: {name}"
        else:
            record["reached"] = True
            record["worker"] = name
            struck = time.monotonic()
            with self._lock:
                for call in self.calls:
                    if call.ended is None:
                        call.faults.append(label)
                        call.marks.append(len(call.tokens))
            try:
                if fault == "drain":
                    self.scale_down_and_back()
                else:
                    resume = inject("kill" if fault == "restart" else fault, hit, self.args.stop_s)
                    self.recover(fault, name, resume)
            except Exception as exc:
                record["note"] = f"recovery failed: {exc}"
            record["recovered_s"] = time.monotonic() - struck
            with self._lock:  # sent while it recovered: what a client arriving meanwhile got
                for call in self.calls:
                    if struck < call.sent and not call.faults:
                        call.during = label
        calls = (target, *bystanders)
        wait_for(lambda: all(c.ended is not None for c in calls), CLIENT_DEADLINE_S + 30, poll_s=0.1)
        ray.wait(blockers, num_returns=len(blockers), timeout=120)
        record["target_ok"] = target.ok
        console.print(
            f"  {label}: {record.get('note') or 'struck'}; "
            f"target {'ok' if target.ok else target.error or target.finish}"
        )

    def reach(self, stage: str, victim: str, target: Call) -> tuple[Any, str]:
        """Wait until ``target`` is at ``stage``; return the victim's actor and name (None and why, if the
        request went past the stage first)."""
        prefill, decode = self.workers(Role.PREFILL), self.workers(Role.DECODE)
        rid = target.rid
        on_prefill = wait_for(lambda: holder(prefill, rid), 60)
        if on_prefill is None and stage in ("queued", "prefilling"):
            return None, "never seen on a prefill worker"
        if stage in ("queued", "prefilling") and victim == "prefill":
            return prefill[on_prefill], on_prefill
        if stage == "transferring":
            found = wait_for(lambda: holder(decode, rid) if len(target.tokens) <= 1 else "late", 60)
            if found in (None, "late"):
                return None, "its first decode step came before the poll"
            if victim == "prefill":
                return (prefill[on_prefill], on_prefill) if on_prefill else (None, "prefill unknown")
            return decode[found], found
        if not wait_for(lambda: len(target.tokens) >= (6 if stage == "decoding" else 4) or target.ended, 120):
            return None, "no tokens"
        if target.ended:
            return None, "it ended first"
        source = holder(decode, rid)
        if source is None:
            return None, "not on a decode worker"
        if stage == "decoding":
            return self.control_or_worker(victim, decode, source)
        destination = next(n for n in decode if n != source)
        moving = self._pool.submit(self.migrate, rid, destination.removeprefix("pdflow-"))
        if stage == "after hand-over":
            moved = wait_for(lambda: moving.done() and holder(decode, rid) == destination, 60)
            if not moved:
                return None, f"not moved: {moving.result() if moving.done() else 'still moving'}"
        else:
            phase = stage
            found = wait_for(
                lambda: migration_phase(decode[source], rid) == phase or moving.done(), 60, 0.001
            )
            if not found or moving.done():
                return None, f"the migration went past {stage}: {moving.result() if moving.done() else ''}"
        if victim == "decode destination":
            return decode[destination], destination
        return self.control_or_worker(victim, decode, source)

    def control_or_worker(self, victim: str, decode: dict[str, Any], source: str) -> tuple[Any, str]:
        if victim == "controller":
            return self.handle.actors[CONTROLLER_NAME], CONTROLLER_NAME
        if victim == "front door":
            return self.handle.actors[FRONTDOOR_NAME], FRONTDOOR_NAME
        return decode[source], source

    def migrate(self, rid: str, to_instance: str) -> str:
        from pdctl.admin_client import AdminClient

        with AdminClient(self.handle.admin_address) as admin:
            info = admin.migrate(rid, to_instance=to_instance)
        return f"{info.outcome} {info.error}".strip()

    def scale_down_and_back(self) -> None:
        from pdctl.admin_client import AdminClient

        with AdminClient(self.handle.admin_address) as admin:
            admin.scale(2, 1, 180.0)
            if not wait_for(lambda: self.health()["decode_workers"] == 1, 180, poll_s=0.5):
                raise RuntimeError("the decode pool did not shrink")
            admin.scale(2, 2, 300.0)

    def recover(self, fault: str, name: str, resume: threading.Thread | None) -> None:
        """Wait until the cluster serves 2P+2D again: the supervisor restarts a controller or front door,
        the controller replaces a dead worker (one stopped for longer than three heartbeat timeouts counts as
        dead); ``restart`` brings the worker back under its name here."""
        if fault == "restart":
            self.restart_under_the_same_name(name)
        elif name.startswith(("pdflow-prefill-", "pdflow-decode-")):
            # first out of service (DEAD, within a heartbeat timeout or two), or 2P+2D is still the old view
            role = Role.PREFILL if name.startswith("pdflow-prefill-") else Role.DECODE
            wait_for(lambda: name not in self.workers(role), 30, poll_s=0.2)
        if resume is not None:
            resume.join()
        if not self.wait_serving():
            raise RuntimeError("not serving 2P+2D again within 300 s")

    # ---- the end ----

    def halt(self) -> None:
        self._stop.set()

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        for f in list(self._futures):
            f.result(timeout=CLIENT_DEADLINE_S + 30)
        held = wait_for(lambda: not self.leaks(), 60, poll_s=0.5)
        leaks = {} if held else self.leaks()
        for call in self.calls:
            call.verdict = (
                check_tokens(call, self.references[call.prompt], self._continuation(call)) if call.ok else ""
            )
        return self.summary(leaks)

    def _continuation(self, call: Call) -> Any:
        return lambda tokens, n: self.reference_run([*self.prompts[call.prompt], *tokens], n)

    def reference_run(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        import ray

        from protocol.messages import SamplingSpec

        sampling = SamplingSpec(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        ids: list[int] = []
        refs = self.reference.generate.options(num_returns="streaming").remote(
            f"ref-{next(self._ids)}", tuple(prompt_ids), sampling
        )
        for ref in refs:
            ids.extend(ray.get(ref, timeout=60).token_ids)
        return ids

    def leaks(self) -> dict[str, dict[str, int]]:
        import ray

        from pdctl.admin_client import AdminClient

        figures = {
            name: ray.get(actor.leak_check.remote(), timeout=30)
            for role in (Role.PREFILL, Role.DECODE)
            for name, actor in self.workers(role).items()
        }
        with AdminClient(self.handle.admin_address) as admin:
            figures["controller"] = {"migrations_in_flight": len(admin.migrations(0).in_flight)}
        fd = self.handle.actors[FRONTDOOR_NAME]
        figures["front door"] = {"requests_in_flight": ray.get(fd.requests_in_flight.remote(), timeout=30)}
        return {n: held for n, of in figures.items() if (held := {k: v for k, v in of.items() if v})}

    def summary(self, leaks: dict[str, dict[str, int]]) -> dict[str, Any]:
        met = [c for c in self.calls if c.faults]
        during = [c for c in self.calls if c.during]
        recoverable = [c for c in met if not any(f.startswith(UNRECOVERABLE) for f in c.faults)]
        cells: dict[str, Counter[str]] = defaultdict(Counter)
        for t in self.trials:
            cell = cells[f"{t['victim']} / {t['stage']} / {t['fault']}"]
            cell["trials"] += 1
            cell["reached"] += t["reached"]
        for c in met:
            for label in set(c.faults):
                cell = cells[label]
                cell["met"] += 1
                cell["completed"] += c.ok
                cell["typed"] += not c.ok and c.typed
                cell["untyped"] += not c.typed
                cell["hung"] += c.hung
                cell["wrong"] += c.verdict == "wrong"
        ttfts: dict[str, list[float]] = defaultdict(list)
        for c in self.calls:
            if c.ok and c.ttft is not None:
                for label in set(c.faults) or {"none"}:
                    ttfts[label].append(c.ttft)
        for label, values in ttfts.items():
            values.sort()
            cells[label]["ttft_p50_ms"] = round(1000 * values[len(values) // 2])
            cells[label]["ttft_max_ms"] = round(1000 * values[-1])
        return {
            "requests": len(self.calls),
            "met_a_fault": len(met),
            "met_a_recoverable_fault": len(recoverable),
            "recoverable_completed": sum(c.ok for c in recoverable),
            "hung": sum(c.hung for c in self.calls),
            "untyped_failures": sum(not c.typed for c in self.calls),
            "wrong_tokens": sum(c.verdict == "wrong" for c in self.calls),
            "resumed": sum(c.verdict == "resumed" for c in self.calls),
            "during_recovery": len(during),
            "during_recovery_completed": sum(c.ok for c in during),
            "during_recovery_errors": Counter(c.error.split(":")[0] for c in during if not c.ok),
            "untouched_failed": sum(not c.ok for c in self.calls if not c.faults and not c.during),
            "errors": Counter(c.error.split(":")[0] or c.finish for c in self.calls if not c.ok),
            "leaks": leaks,
            "restarts": [name for _, name in self.restarts],
            "cells": {k: dict(v) for k, v in cells.items()},
            "trials": self.trials,
            "calls": [asdict(c) for c in self.calls],
        }


def main() -> None:
    args = parse_args()
    apply_env_defaults(default_cache_dir().parents[1])
    config = ClusterConfig.load(
        None,
        {
            "frontdoor.http_port": free_port(),
            "frontdoor.grpc_port": free_port(),
            "controller.admin_port": free_port(),
            "prefill.replicas": 2,
            "decode.replicas": 2,
            "frontdoor.token_timeout_s": 30,
            "migration.final_blocks": 0,  # pre-copy stages even for short requests
            # float32, so that the token check means something: in bfloat16 the batch a step runs in and a
            # prefix-cache hit change the rounding enough to flip a greedy token now and then, fault or not
            "engine.dtype": "float32",
        },
    )
    model = prepare_model()
    cluster = LocalCluster(config, model)
    with console.status("starting a 2P+2D cluster and a reference engine"):
        cluster.start()
        reference = cluster.add_reference()
        cluster.wait_until_serving()
    chaos = Chaos(cluster, reference, args)
    try:
        chaos.references = [chaos.reference_run(p, MAX_OUTPUT) for p in chaos.prompts]
        threads = [threading.Thread(target=f, daemon=True) for f in (chaos.load, chaos.supervise)]
        for t in threads:
            t.start()
        only = [v.strip() for v in args.only.split(",") if v.strip()]
        for _ in range(args.rounds):
            for victim, stages in STAGES.items():
                for stage in stages:
                    for fault in FAULTS[victim]:
                        if not only or any(o in f"{victim} / {stage} / {fault}" for o in only):
                            chaos.trial(victim, stage, fault)
        result = chaos.finish()
    finally:
        chaos.halt()  # no load, no supervisor restarting what stop() stops
        cluster.stop()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str))
    ok = report(result)
    console.print(f"wrote {args.json}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
