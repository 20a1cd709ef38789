"""Load a trace slice and replay it against a running cluster (``pdctl bench`` and the demo)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pdctl.bench import BenchResult, run_bench
from pdctl.chat import served_model
from simulator.traces import load_trace


async def replay(
    base_url: str,
    trace: Path,
    *,
    start: float = 0.0,
    duration: float | None = 60.0,
    time_scale: float = 1.0,
    thin: int = 1,
    max_requests: int | None = None,
    max_prompt_tokens: int | None = None,
    max_output_tokens: int | None = None,
    max_model_len: int | None = None,
    slo_ttft: float = 2.0,
    slo_tpot: float = 0.2,
    timeout: float = 300.0,
    progress: bool = True,
    say: Callable[[str], object] = print,
) -> BenchResult:
    """``thin`` keeps every N-th request of the slice, arrival times unchanged: a lighter load with the
    trace's own burstiness and length mix."""
    if thin < 1:
        raise ValueError(f"thin must be >= 1, got {thin}")
    loaded = load_trace(
        trace,
        start_s=start,
        duration_s=duration,
        time_scale=time_scale,
        max_prompt_tokens=max_prompt_tokens,
        max_output_tokens=max_output_tokens,
        max_model_len=max_model_len,
    )
    requests = loaded.requests[::thin]
    if max_requests is not None:
        requests = requests[:max_requests]
    say(loaded.describe() + (f"; keeping every {thin}th: {len(requests)} requests" if thin > 1 else ""))
    model = served_model(base_url)
    return await run_bench(
        base_url,
        model,
        requests,
        tokenizer_vocab_size=None,
        slo_ttft_s=slo_ttft,
        slo_tpot_s=slo_tpot,
        concurrency_limit=None,
        progress=progress,
        request_timeout_s=timeout,
    )
