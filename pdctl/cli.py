"""``pdctl``: run and operate a pdflow cluster. ``up``/``down`` start and stop a local cluster, ``status``,
``requests`` and ``explain`` read the admin API, ``chat`` asks one question, ``bench`` replays a trace,
``demo`` does it all; the decode-pool operations are ``pdctl.operations``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from pdctl.admin_client import AdminClient, AdminUnavailable
from pdctl.options import (
    REPO_TRACE,
    AdminOpt,
    ConfigOpt,
    JsonOpt,
    SetOpt,
    UrlOpt,
    admin_address,
    app,
    build_config,
    check_credentials,
    err,
    fail,
    http_url,
    message_json,
    out,
    print_json,
    stop_on_signals,
)
from pdctl.runstate import RunState, run_dir
from pdctl.views import render_requests, render_status, status_dict


@app.command()
def up(
    prefill: Annotated[int | None, typer.Option(help="Prefill workers.")] = None,
    decode: Annotated[int | None, typer.Option(help="Decode workers.")] = None,
    http_port: Annotated[int | None, typer.Option(help="OpenAI HTTP port.")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC Router port.")] = None,
    admin_port: Annotated[int | None, typer.Option(help="gRPC Admin port.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Run in the background.")] = False,
    autoscale: Annotated[
        bool, typer.Option("--autoscale", help="Let the autoscaler size both pools (autoscaler.enabled).")
    ] = False,
) -> None:
    """Start a local cluster (Ray head, controller, workers, front door). Ctrl-C stops it cleanly."""
    cfg = build_config(
        config,
        set_,
        **{
            "autoscaler.enabled": True if autoscale else None,
            "prefill.replicas": prefill,
            "decode.replicas": decode,
            "frontdoor.http_port": http_port,
            "frontdoor.grpc_port": grpc_port,
            "controller.admin_port": admin_port,
        },
    )
    check_credentials(cfg)
    if (running := RunState.read()) is not None:
        fail(f"a cluster is already running (pid {running.pid}, {running.http_url}); `pdctl down` first")
    if detach:
        _up_detached([a for a in sys.argv[1:] if a not in ("--detach", "-d")], cfg.worker.start_timeout_s)
        return
    from pdctl.local_cluster import LocalCluster
    from pdctl.model_cache import model_dir

    try:
        model = model_dir(cfg.model.path)
    except FileNotFoundError as exc:
        fail(str(exc))
    cluster = LocalCluster(cfg, model)
    # During start, Ctrl-C (KeyboardInterrupt) or SIGTERM (Ray's handler exits) unwinds through start(),
    # which stops whatever had started. Once serving, both signals ask for a clean stop; a second one
    # while stopping falls back to Python's default and ends the process.
    with err.status("starting pdflow...") as spinner:
        handle = cluster.start(lambda msg: spinner.update(msg))
    stop = stop_on_signals()
    try:
        cluster.wait_until_serving()
        RunState(os.getpid(), handle.http_url, handle.grpc_address, handle.admin_address).write()
        out.print(
            f"pdflow is serving [bold]{cfg.model.name}[/bold] with {cfg.prefill.replicas} prefill + "
            f"{cfg.decode.replicas} decode worker(s)\n  OpenAI HTTP  {handle.http_url}/v1\n"
            f"  gRPC Router  {handle.grpc_address}\n  gRPC Admin   {handle.admin_address}\n"
            "Ctrl-C (or `pdctl down`) stops it.",
            highlight=False,
        )
        while not stop.wait(1.0):
            for name in cluster.supervise():
                err.print(f"{name} was gone: restarted it", highlight=False)
        err.print("stopping...")
    finally:
        RunState.clear()
        cluster.stop()


def _up_detached(args: list[str], start_timeout_s: float) -> None:
    log_path = run_dir() / "pdctl-up.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pdctl.cli", *args],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + start_timeout_s + 60
    with err.status("starting pdflow in the background..."):
        while time.monotonic() < deadline:
            state = RunState.read()
            if state is not None and state.pid == proc.pid:
                out.print(
                    f"pdflow is up (pid {proc.pid}): {state.http_url}/v1, gRPC {state.grpc_address}, "
                    f"admin {state.admin_address}; log: {log_path}",
                    highlight=False,
                )
                return
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").splitlines()[-15:]
                fail("the cluster failed to start:\n" + "\n".join(tail))
            time.sleep(0.5)
    proc.terminate()
    fail(f"the cluster did not start within {start_timeout_s + 60:.0f}s; see {log_path}")


@app.command()
def down(timeout: Annotated[float, typer.Option(help="Seconds to wait for a clean stop.")] = 90.0) -> None:
    """Stop the local cluster started by `pdctl up`."""
    state = RunState.read()
    if state is None:
        out.print("no pdflow cluster is running")
        return
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with err.status(f"stopping pdflow (pid {state.pid})..."):
        while time.monotonic() < deadline:
            try:
                os.kill(state.pid, 0)
            except ProcessLookupError:
                out.print("pdflow stopped")
                return
            time.sleep(0.3)
    os.kill(state.pid, signal.SIGKILL)
    RunState.clear()
    out.print(f"pdflow did not stop within {timeout:.0f}s: killed pid {state.pid}")


@app.command()
def status(admin: AdminOpt = None, as_json: JsonOpt = False) -> None:
    """Instances with their role, state, load, KV usage and tokens/s."""
    try:
        with AdminClient(admin_address(admin)) as client:
            st = client.status()
    except AdminUnavailable as exc:
        fail(str(exc))
    if as_json:
        print_json(status_dict(st))
    else:
        render_status(out, st)


@app.command()
def requests(
    admin: AdminOpt = None,
    state: Annotated[str, typer.Option(help="Filter: a state, or 'active'.")] = "",
    limit: Annotated[int, typer.Option(help="Most recent N.")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """Recent requests and where they ran."""
    try:
        with AdminClient(admin_address(admin)) as client:
            resp = client.requests(state, limit)
    except AdminUnavailable as exc:
        fail(str(exc))
    if as_json:
        print_json(message_json(resp))
    else:
        render_requests(out, resp.requests)


@app.command()
def explain(request_id: str, admin: AdminOpt = None, as_json: JsonOpt = False) -> None:
    """Every state change of one request."""
    try:
        with AdminClient(admin_address(admin)) as client:
            resp = client.requests(request_id=request_id)
    except AdminUnavailable as exc:
        fail(str(exc))
    if not resp.requests:
        fail(f"the controller knows no request {request_id!r}")
    if as_json:
        print_json(message_json(resp.requests[0]))
        return
    render_requests(out, resp.requests, events=True)


@app.command()
def chat(
    prompt: str,
    url: UrlOpt = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
) -> None:
    """Ask one question and stream the answer."""
    from pdctl.chat import stream_chat

    try:
        stream_chat(
            http_url(url),
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            write=lambda text: (sys.stdout.write(text), sys.stdout.flush()),
        )
    except RuntimeError as exc:
        fail(str(exc))
    sys.stdout.write("\n")


@app.command()
def bench(
    trace: Annotated[
        Path, typer.Option(help="Azure-format CSV (TIMESTAMP,ContextTokens,GeneratedTokens).")
    ] = REPO_TRACE,
    url: UrlOpt = None,
    start: Annotated[float, typer.Option(help="Skip this many seconds of the trace.")] = 0.0,
    duration: Annotated[float | None, typer.Option(help="Replay this many seconds of the trace.")] = 60.0,
    time_scale: Annotated[float, typer.Option(help="Stretch arrivals (10 = ten times slower).")] = 1.0,
    thin: Annotated[int, typer.Option(help="Keep every N-th request (arrival times unchanged).")] = 1,
    max_requests: Annotated[int | None, typer.Option(help="Cap the number of requests.")] = None,
    max_prompt_tokens: Annotated[int | None, typer.Option(help="Clip prompts to this length.")] = None,
    max_output_tokens: Annotated[int | None, typer.Option(help="Clip outputs to this length.")] = None,
    slo_ttft: Annotated[float, typer.Option(help="TTFT target, seconds.")] = 2.0,
    slo_tpot: Annotated[float, typer.Option(help="TPOT target, seconds.")] = 0.2,
    timeout: Annotated[float, typer.Option(help="Deadline per request, seconds.")] = 300.0,
    as_json: JsonOpt = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the results as JSON here.")
    ] = None,
) -> None:
    """Replay a trace against a running cluster and print TTFT/TPOT/latency percentiles and SLO attainment."""
    from pdctl.replay import replay

    base = http_url(url)
    try:
        result = asyncio.run(
            replay(
                base,
                trace,
                start=start,
                duration=duration,
                time_scale=time_scale,
                thin=thin,
                max_requests=max_requests,
                max_prompt_tokens=max_prompt_tokens,
                max_output_tokens=max_output_tokens,
                slo_ttft=slo_ttft,
                slo_tpot=slo_tpot,
                timeout=timeout,
                say=err.print,
            )
        )
    except (OSError, ValueError, RuntimeError) as exc:
        fail(str(exc))
    if as_json:
        sys.stdout.write(result.to_json() + "\n")
    else:
        result.render_table(out)
    if output is not None:
        output.write_text(result.to_json())
        err.print(f"results written to {output}")


@app.command()
def demo(
    trace: Annotated[Path, typer.Option(help="Azure conversation trace CSV.")] = REPO_TRACE,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Start a 1P+1D cluster, ask one question, replay a minute of the trace, print the table, stop."""
    from pdctl.demo import run_demo

    cfg = build_config(
        config, set_, **{"frontdoor.http_port": 0, "frontdoor.grpc_port": 0, "controller.admin_port": 0}
    )
    sys.exit(run_demo(cfg, trace, out, err))


def main() -> None:
    from pdctl import (
        auth,  # noqa: F401  (adds auth: new-key, hash-key)
        operations,  # noqa: F401  (adds migrate, cordon, uncordon, drain, migrations after these)
        pod,  # noqa: F401  (adds pod: head, worker, drain)
        scaling,  # noqa: F401  (adds autoscaler, scale, set-role)
    )

    app()


if __name__ == "__main__":
    main()
