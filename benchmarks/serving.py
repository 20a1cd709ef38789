"""Disaggregated (1 prefill + 1 decode) against one colocated vLLM engine, on the same trace slice, and the
front door's overhead. Prints a table and writes JSON.

    .venv/bin/python benchmarks/serving.py [--thin 8] [--duration 60] [--json results/serving.json]

The colocated baseline is vLLM's own OpenAI server with the same model and engine settings, given both
cores (the 1P+1D cluster gives each engine one). Front-door overhead is the median TTFT of sequential
streamed requests through the HTTP API minus the median time of the same prefill called on the prefill
worker actor directly (no HTTP, no tokenization, no dispatch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdctl.bench import BenchResult, synthesize_prompt  # noqa: E402
from pdctl.local_cluster import LocalCluster, apply_env_defaults, free_port  # noqa: E402
from pdctl.model_cache import default_cache_dir, prepare_model  # noqa: E402
from pdctl.replay import replay  # noqa: E402
from protocol.config import ClusterConfig  # noqa: E402

TRACE = ROOT / "benchmarks" / "traces" / "AzureLLMInferenceTrace_conv.csv"
console = Console(width=None if sys.stdout.isatty() else 150)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of trace")
    p.add_argument("--thin", type=int, default=8, help="keep every N-th request")
    p.add_argument("--max-prompt-tokens", type=int, default=1024)
    p.add_argument("--max-output-tokens", type=int, default=48)
    p.add_argument("--overhead-requests", type=int, default=12)
    p.add_argument("--overhead-prompt-tokens", type=int, default=256)
    p.add_argument("--json", type=Path, default=ROOT / "results" / "serving.json")
    return p.parse_args()


async def replay_slice(url: str, args: argparse.Namespace, max_model_len: int) -> BenchResult:
    return await replay(
        url,
        args.trace,
        duration=args.duration,
        thin=args.thin,
        max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_output_tokens,
        max_model_len=max_model_len,
        progress=True,
        say=console.print,
    )


async def ttft_via_http(url: str, model: str, prompt: list[int]) -> float:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 2,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    async with httpx.AsyncClient(timeout=60) as client:
        start = time.perf_counter()
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            resp.raise_for_status()
            first = None
            async for line in resp.aiter_lines():
                if first is None and line.startswith("data: ") and '"text"' in line:
                    first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("the stream carried no token")
    return first


def _prefill_seconds_sum(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("pdflow_prefill_seconds_sum "):
            return float(line.split()[1])
    raise RuntimeError("the front door exports no pdflow_prefill_seconds")


def frontdoor_overhead(cluster: LocalCluster, url: str, model: str, n: int, tokens: int) -> dict[str, float]:
    """Two measures, on sequential requests with fresh prompts (no prefix-cache hits):

    * paired: each request's TTFT seen by the HTTP client minus the time the prefill worker's engine spent
      on that same request (``pdflow_prefill_seconds``, timed inside the worker around the engine call).
      What is left is HTTP, tokenization, dispatch, the Ray hop to the worker and the stream back.
    * unpaired: the same prefill work sent to the prefill worker actor straight from this process (Ray hop,
      no front door), alternating with the HTTP requests.
    """
    import ray

    from protocol.ids import RequestId
    from protocol.messages import PrefillRequest, SamplingSpec
    from protocol.snapshots import Role

    prefill = next(iter(cluster.handle.workers(Role.PREFILL).values()))
    through, engine, direct = [], [], []
    for i in range(n):
        before = _prefill_seconds_sum(url)
        through.append(
            asyncio.run(ttft_via_http(url, model, synthesize_prompt(tokens, index=10_000 + 2 * i)))
        )
        engine.append(_prefill_seconds_sum(url) - before)
        request = PrefillRequest(
            RequestId(f"direct-{i}"),
            tuple(synthesize_prompt(tokens, index=10_001 + 2 * i)),
            SamplingSpec(max_tokens=1, temperature=0),
            hand_off=False,
        )
        start = time.perf_counter()
        ray.get(prefill.prefill.remote(request), timeout=60)
        direct.append(time.perf_counter() - start)
    paired = [t - e for t, e in zip(through, engine, strict=True)]
    return {
        "ttft_frontdoor_p50_s": statistics.median(through),
        "engine_prefill_p50_s": statistics.median(engine),
        "overhead_paired_p50_s": statistics.median(paired),
        "overhead_paired_max_s": max(paired),
        "direct_actor_call_p50_s": statistics.median(direct),
        "samples": n,
        "prompt_tokens": tokens,
    }


def run_disaggregated(args: argparse.Namespace, model_path: Path) -> tuple[BenchResult, dict[str, float]]:
    config = ClusterConfig.load(
        overrides={"frontdoor.http_port": 0, "frontdoor.grpc_port": 0, "controller.admin_port": 0}
    )
    cluster = LocalCluster(config, model_path)
    try:
        with console.status("starting the 1P+1D cluster..."):
            handle = cluster.start()
            cluster.wait_until_serving()
        result = asyncio.run(replay_slice(handle.http_url, args, config.engine.max_model_len))
        with console.status("measuring front-door overhead..."):
            overhead = frontdoor_overhead(
                cluster,
                handle.http_url,
                config.model.name,
                args.overhead_requests,
                args.overhead_prompt_tokens,
            )
        return result, overhead
    finally:
        cluster.stop()


def run_colocated(args: argparse.Namespace, model_path: Path, max_model_len: int) -> BenchResult:
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="2")
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_path),
        "--served-model-name",
        "SmolLM2-135M-Instruct",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--max-model-len",
        str(max_model_len),
        "--no-enable-chunked-prefill",
        "--max-num-batched-tokens",
        str(max(max_model_len, 2048)),
        "--dtype",
        "bfloat16",
    ]
    log_path = ROOT / "results" / "colocated-vllm.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        with console.status("starting the colocated vLLM server..."):
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vLLM server exited with {proc.returncode}; see {log_path}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vLLM server not healthy after 300 s; see {log_path}")
                time.sleep(1)
        return asyncio.run(replay_slice(url, args, max_model_len))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def row(name: str, r: BenchResult) -> list[str]:
    s = r.summary

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:,.0f}"

    return [
        name,
        f"{s.ok}/{s.count}",
        ms(s.ttft.p50),
        ms(s.ttft.p99),
        ms(s.tpot.p50),
        ms(s.tpot.p99),
        ms(s.e2e.p50),
        ms(s.e2e.p99),
        f"{s.output_tokens_per_s:.1f}",
        f"{s.slo_attainment:.0%}",
    ]


def main() -> int:
    args = parse_args()
    apply_env_defaults(default_cache_dir().parents[1])
    model_path = prepare_model()
    disagg, overhead = run_disaggregated(args, model_path)
    colocated = run_colocated(args, model_path, ClusterConfig().engine.max_model_len)

    table = Table(
        title=f"serving: {args.trace.name}, {args.duration:.0f} s, every {args.thin}th request, "
        f"prompts <= {args.max_prompt_tokens}, outputs <= {args.max_output_tokens} tokens"
    )
    for col in (
        "setup",
        "ok",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "TPOT p50 ms",
        "TPOT p99 ms",
        "e2e p50 ms",
        "e2e p99 ms",
        "out tok/s",
        "SLO",
    ):
        table.add_column(col, justify="right" if col != "setup" else "left")
    table.add_row(*row("pdflow 1P+1D (disaggregated)", disagg))
    table.add_row(*row("vLLM, one colocated engine", colocated))
    console.print(table)
    console.print(
        f"front-door overhead ({overhead['samples']} sequential {overhead['prompt_tokens']}-token prompts): "
        f"TTFT via HTTP p50 {overhead['ttft_frontdoor_p50_s'] * 1000:.1f} ms; the prefill worker's engine "
        f"time for the same requests p50 {overhead['engine_prefill_p50_s'] * 1000:.1f} ms; paired overhead "
        f"p50 {overhead['overhead_paired_p50_s'] * 1000:.1f} ms (max "
        f"{overhead['overhead_paired_max_s'] * 1000:.1f} ms); prefill called on the worker actor "
        f"directly p50 "
        f"{overhead['direct_actor_call_p50_s'] * 1000:.1f} ms"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "disaggregated": json.loads(disagg.to_json()),
                "colocated": json.loads(colocated.to_json()),
                "frontdoor_overhead": overhead,
            },
            indent=2,
        )
    )
    console.print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
