"""``pdctl demo`` (``make demo``): the main job on one machine. Start a local 1 prefill + 1 decode cluster,
ask one chat question, replay a minute of the Azure conversation trace thinned to what two CPU cores can
serve, print the results table, stop everything."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from rich.console import Console

from protocol.config import ClusterConfig

QUESTION = "What is the capital of France?"
# A minute of the conversation trace holds ~190 requests (~170k prompt and ~44k output tokens): far beyond
# two CPU cores. Every 12th request at its real arrival time (16 requests, ~0.27 req/s), prompts clipped to
# 1024 tokens and outputs to 48, keeps the trace's burstiness and length mix at a load 1P+1D on CPU finishes
# without errors; the prefill engine (one core, ~1 ms per prompt token) still queues behind bursts.
DEMO_DURATION_S, DEMO_THIN, DEMO_MAX_PROMPT, DEMO_MAX_OUTPUT = 60.0, 12, 1024, 48


def run_demo(config: ClusterConfig, trace: Path, out: Console, err: Console) -> int:
    from pdctl.chat import stream_chat
    from pdctl.local_cluster import LocalCluster
    from pdctl.model_cache import prepare_model
    from pdctl.replay import replay

    if not trace.is_file():
        err.print(f"[red]error:[/red] trace file not found: {trace}")
        return 1
    config = config.model_copy(
        update={
            "prefill": config.prefill.model_copy(update={"replicas": 1}),
            "decode": config.decode.model_copy(update={"replicas": 1}),
        }
    )
    t0 = time.monotonic()
    with err.status("preparing the model (first run converts it, ~30 s)..."):
        model_path = prepare_model()
    cluster = LocalCluster(config, model_path)
    try:
        with err.status("starting pdflow...") as spinner:
            handle = cluster.start(lambda msg: spinner.update(msg))
            cluster.wait_until_serving()
        err.print(
            f"cluster up in {time.monotonic() - t0:.0f}s: {handle.http_url}/v1 · gRPC {handle.grpc_address}"
        )
        out.print(f"\n[bold]Q:[/bold] {QUESTION}\n[bold]A:[/bold] ", end="")
        stream_chat(
            handle.http_url,
            QUESTION,
            max_tokens=64,
            temperature=0.0,
            write=lambda text: (sys.stdout.write(text), sys.stdout.flush()),
        )
        out.print("\n")
        result = asyncio.run(
            replay(
                handle.http_url,
                trace,
                max_model_len=config.engine.max_model_len,
                say=err.print,
                duration=DEMO_DURATION_S,
                thin=DEMO_THIN,
                max_prompt_tokens=DEMO_MAX_PROMPT,
                max_output_tokens=DEMO_MAX_OUTPUT,
            )
        )  # type: ignore[arg-type]
        result.render_table(out)
        return 0 if result.summary.ok > 0 else 1
    finally:
        with err.status("stopping pdflow..."):
            cluster.stop()
