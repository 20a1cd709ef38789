"""A rolling update of the decode pool under load, through the Helm chart's own commands, on real engines.

The pods of the chart are processes here, started with the commands the chart's containers run: a Ray head
(``ray start --head``) with ``pdctl pod head`` beside it, and one ``pdctl pod worker`` per pod (one prefill,
two decode), all joined to that Ray cluster. Clients stream completions the whole time. The decode pool is
then updated as a Deployment with ``maxSurge: 1, maxUnavailable: 0`` does it: for each old pod, a new one
starts and the update waits until its ``/readyz`` answers 200 (the chart's readiness probe), then the old
pod's preStop hook runs (``pdctl pod drain``, the chart's ``lifecycle.preStop`` command), then the pod gets
SIGTERM, as the kubelet sends it once the hook returns.

The same update then runs again without the preStop hook (``--no-compare`` skips it), which is what a
chart without the hook would do: the pod gets SIGTERM while it decodes. Each phase reports the requests
that finished, the ones that failed, and what each drain moved.

    .venv/bin/python benchmarks/rolling_update.py [--clients 6] [--max-tokens 128] [--no-compare]
        [--output results/rolling_update.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "List the steps to bake bread at home, with the reasons behind each step.",
    "Describe the water cycle and why it matters for farming.",
]


@dataclass
class Phase:
    name: str
    started: float = 0.0
    ended: float = 0.0
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)


class Pods:
    """The chart's pods as processes on this machine, each with its log."""

    def __init__(self, workdir: Path, env: dict[str, str], ray_address: str, config: Path) -> None:
        self.workdir, self.env, self.ray_address, self.config = workdir, env, ray_address, config
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.probe_ports: dict[str, int] = {}

    def start(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (open while the process runs)
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=log, env=self.env, start_new_session=True
        )

    def worker(self, name: str, role: str) -> None:
        from pdctl.local_cluster import free_port

        port = free_port()
        self.probe_ports[name] = port
        pdctl = str(BIN / "pdctl")
        self.start(
            name,
            [pdctl, "pod", "worker", "--role", role, "--instance-id", name, "--ray-address", self.ray_address,
             "--probe-port", str(port), "-c", str(self.config)],
        )  # fmt: skip

    def wait_ready(self, name: str, timeout_s: float = 300.0) -> float:
        """Poll ``/readyz`` as the kubelet does; seconds until it answered 200."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"pod {name} exited with {self.procs[name].returncode}: see its log")
            try:
                if (
                    httpx.get(f"http://127.0.0.1:{self.probe_ports[name]}/readyz", timeout=5).status_code
                    == 200
                ):
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"pod {name} not ready after {timeout_s:.0f} s")

    def terminate(self, name: str, grace_s: float = 60.0) -> float:
        """SIGTERM, then SIGKILL after the grace period (terminationGracePeriodSeconds); seconds to exit."""
        proc = self.procs.pop(name)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return time.monotonic() - t0

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.terminate(name, grace_s=30.0)


class Load:
    """Closed-loop clients streaming completions; each request counts for the phase it started in."""

    def __init__(self, url: str, model: str, clients: int, max_tokens: int) -> None:
        self.url, self.model, self.clients, self.max_tokens = url, model, clients, max_tokens
        self.phase: Phase | None = None
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)
        ]
        self._lock = threading.Lock()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=300)

    def _client(self, index: int) -> None:
        for n in itertools.count():
            if self._stop.is_set():
                return
            phase = self.phase
            error = self._one(f"{PROMPTS[(index + n) % len(PROMPTS)]} (client {index}, request {n})")
            with self._lock:
                if phase is None:
                    continue
                if error:
                    phase.failed += 1
                    phase.errors.append(error)
                else:
                    phase.ok += 1

    def _one(self, prompt: str) -> str:
        """One streamed completion; '' when every token came and the stream ended well, else the error."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        tokens, finish = 0, ""
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=180) as resp:
                if resp.status_code != 200:
                    return f"HTTP {resp.status_code}: {resp.read()[:200]!r}"
                for line in resp.iter_lines():
                    if not line.startswith("data:") or line.endswith("[DONE]"):
                        continue
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        return f"stream error: {chunk['error']}"
                    for choice in chunk.get("choices", []):
                        finish = choice.get("finish_reason") or finish
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if finish != "length" or tokens != self.max_tokens:
            return f"ended early: finish {finish!r}, {tokens}/{self.max_tokens} tokens"
        return ""


def running_on(admin: str, instance: str) -> int:
    """Requests running on ``instance``, as the controller last heard."""
    from pdctl.admin_client import AdminClient

    with AdminClient(admin) as client:
        found = [i.num_running for i in client.instances().instances if i.instance_id == instance]
    return found[0] if found else 0


def roll(
    pods: Pods, load: Load, phase: Phase, old: list[str], new: list[str], admin: str, prestop: bool
) -> None:
    """maxSurge 1, maxUnavailable 0: a new pod ready, then the old one's preStop (if any), then SIGTERM."""
    load.phase = phase
    phase.started = time.monotonic()
    for gone, coming in zip(old, new, strict=True):
        step: dict[str, Any] = {"old": gone, "new": coming}
        pods.worker(coming, "decode")
        step["new_ready_s"] = round(pods.wait_ready(coming), 1)
        step["running_before"] = running_on(admin, gone)
        if prestop:
            t0 = time.monotonic()
            hook = subprocess.run(
                [str(BIN / "pdctl"), "pod", "drain", "--instance-id", gone, "--admin", admin,
                 "--timeout", "240"],
                env=pods.env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            step["prestop_s"] = round(time.monotonic() - t0, 1)
            step["prestop_rc"] = hook.returncode
            step["prestop_said"] = (hook.stdout + hook.stderr).strip()
        step["terminate_s"] = round(pods.terminate(gone), 1)
        phase.steps.append(step)
        print(f"  {phase.name}: {step}", flush=True)
    time.sleep(2.0)  # let requests that started before the last pod went finish in this phase's count
    phase.ended = time.monotonic()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=6, help="concurrent streaming clients")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per request (all generated)")
    parser.add_argument("--no-compare", action="store_true", help="skip the run without the preStop hook")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "rolling_update.json")
    args = parser.parse_args()

    from pdctl.admin_client import AdminClient, AdminUnavailable
    from pdctl.local_cluster import ENV_DEFAULTS, free_port
    from pdctl.model_cache import default_cache_dir, prepare_model

    prepare_model()
    workdir = Path(tempfile.mkdtemp(prefix="pdflow-rolling-"))
    # on loopback, Ray without auth (unless the environment says otherwise) for `ray start` and the pods alike
    env = {
        **ENV_DEFAULTS,
        "RAY_AUTH_MODE": "disabled",
        **os.environ,
        "VLLM_CACHE_ROOT": str(default_cache_dir().parents[1] / "vllm"),
    }
    env["PYTHONPATH"] = str(ROOT)
    ray_port, http_port, admin_port = free_port(), free_port(), free_port()
    config = workdir / "cluster.yaml"
    # replicas 0: the head starts no worker, the pods join by themselves (as with kubernetes.pools=kubernetes,
    # which needs an API server for its actuator; the update path measured here does not use the actuator)
    config.write_text(yaml.safe_dump({
        "prefill": {"replicas": 0}, "decode": {"replicas": 0},
        "frontdoor": {"http_port": http_port, "grpc_port": 0},
        "controller": {"admin_port": admin_port},
    }))  # fmt: skip
    ray_address = f"127.0.0.1:{ray_port}"
    admin = f"127.0.0.1:{admin_port}"
    url = f"http://127.0.0.1:{http_port}"
    pods = Pods(workdir, env, ray_address, config)
    print(f"logs in {workdir}", flush=True)
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--port", str(ray_port), "--node-ip-address", "127.0.0.1",
         "--num-cpus", str(os.cpu_count() or 2), "--include-dashboard", "false", "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    phases: list[Phase] = []
    load: Load | None = None
    try:
        pods.start(
            "head", [str(BIN / "pdctl"), "pod", "head", "--ray-address", ray_address, "-c", str(config)]
        )
        deadline = time.monotonic() + 180
        while True:
            try:
                with AdminClient(admin) as client:
                    client.status()
                break
            except AdminUnavailable:
                if time.monotonic() > deadline or pods.procs["head"].poll() is not None:
                    raise RuntimeError(f"the head did not come up: see {workdir}/head.log") from None
                time.sleep(1.0)
        for name, role in (("prefill-a", "prefill"), ("decode-a", "decode"), ("decode-b", "decode")):
            pods.worker(name, role)
        for name in ("prefill-a", "decode-a", "decode-b"):
            print(f"  {name} ready in {pods.wait_ready(name):.0f} s", flush=True)
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        load = Load(url, model, args.clients, args.max_tokens)
        load.start()
        time.sleep(5.0)  # every client has a request running
        with_hook = Phase("with the preStop drain")
        phases.append(with_hook)
        roll(pods, load, with_hook, ["decode-a", "decode-b"], ["decode-c", "decode-d"], admin, prestop=True)
        if not args.no_compare:
            without = Phase("without it (SIGTERM only)")
            phases.append(without)
            roll(
                pods, load, without, ["decode-c", "decode-d"], ["decode-e", "decode-f"], admin, prestop=False
            )
        load.phase = None
    finally:
        if load is not None:
            load.stop()
        pods.stop_all()
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)

    print(f"\nrolling update of the decode pool (2 pods, maxSurge 1, maxUnavailable 0), "
          f"{args.clients} clients, {args.max_tokens} tokens per request")  # fmt: skip
    print(f"{'phase':<28} {'seconds':>8} {'finished':>9} {'failed':>7} {'running on the old pods':>24}")
    for p in phases:
        running = " + ".join(str(s["running_before"]) for s in p.steps)
        print(f"{p.name:<28} {p.ended - p.started:>8.0f} {p.ok:>9} {p.failed:>7} {running:>24}")
        for s in p.steps:
            print(f"    {s['old']} -> {s['new']}: {s.get('prestop_said', 'no preStop hook')}")
        for e in p.errors[:5]:
            print(f"    failed: {e[:200]}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps([asdict(p) for p in phases], indent=2))
    print(f"results written to {args.output}")
    return 0 if phases and phases[0].failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
