"""What every ``pdctl`` command shares: the Typer app, the consoles (tables on stdout, progress and errors
on stderr), the common options, JSON output, the cluster config from flags, and where the local cluster's
APIs are."""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from pdctl.runstate import RunState

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run and operate a pdflow cluster (disaggregated prefill/decode LLM serving).",
)
out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Cluster config YAML file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config field, e.g. --set engine.max_model_len=4096 (repeatable)."),
]


def fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON to stdout instead of a table.")]
REPO_TRACE = Path(__file__).resolve().parents[1] / "benchmarks" / "traces" / "AzureLLMInferenceTrace_conv.csv"


def print_json(data: Any) -> None:
    """Machine-readable output: JSON on stdout, nothing else there (progress goes to stderr)."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def message_json(message: Any) -> Any:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, always_print_fields_with_no_presence=True)


def build_config(config: Path | None, sets: list[str] | None, **named: Any) -> Any:
    from pydantic import ValidationError

    from protocol.config import ClusterConfig

    overrides: dict[str, Any] = {k: v for k, v in named.items() if v is not None}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--set takes key=value, got {item!r}")
        overrides[key.strip()] = value.strip()
    try:
        return ClusterConfig.load(config, overrides)
    except (ValidationError, ValueError, OSError) as exc:
        fail(f"invalid configuration: {exc}")


def check_credentials(cfg: Any, *, api: bool = True, admin: bool = True, kv: bool = True) -> None:
    """Before anything starts: refuse to serve a surface this process serves (the API, the admin API, KV
    side channels) on an address other machines reach without its credential (``protocol.auth``), with the
    message that says how to set it."""
    from protocol.auth import CredentialError, Credentials, is_loopback

    try:
        credentials = Credentials.from_env()
        if api:
            credentials.require_api_keys_for(cfg.frontdoor.host)
        if admin:
            credentials.require_admin_token_for(cfg.controller.admin_host)
        if kv:
            credentials.require_cluster_secret_for(cfg.kv.side_channel_host)
            if cfg.kv.connector.value == "nixl" and not is_loopback(cfg.kv.side_channel_host):
                raise CredentialError(
                    "kv.connector: nixl (vLLM's NixlConnector, a baseline) serves its own side channel, "
                    "which has no authentication: use it on one machine only, or kv.connector: pdflow."
                )
    except CredentialError as exc:
        fail(str(exc))


def admin_address(admin: str | None) -> str:
    if admin:
        return admin
    state = RunState.read()
    if state is None:
        fail("no local cluster is running; start one with `pdctl up` or pass --admin HOST:PORT")
    assert state is not None
    return state.admin_address


def http_url(url: str | None) -> str:
    if url:
        return url.rstrip("/")
    state = RunState.read()
    if state is None:
        fail("no local cluster is running; start one with `pdctl up` or pass --url http://HOST:PORT")
    assert state is not None
    return state.http_url


AdminOpt = Annotated[
    str | None, typer.Option(help="Admin API address HOST:PORT (default: the local cluster).")
]
UrlOpt = Annotated[str | None, typer.Option(help="HTTP base URL (default: the local cluster).")]


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM (what Kubernetes sends, after a pod's preStop hook): the caller
    stops cleanly. A second signal falls back to the default and ends the process at once."""
    stop = threading.Event()

    def _request_stop(signum: int, _frame: object) -> None:
        stop.set()
        signal.signal(signum, signal.SIG_DFL)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _request_stop)
    return stop
