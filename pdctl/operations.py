"""``pdctl`` commands that operate a running cluster's decode pool: ``migrate`` a request, ``cordon`` and
``uncordon`` a worker, ``drain`` it, and list the ``migrations``."""

from __future__ import annotations

from typing import Annotated

import typer

from pdctl.admin_client import AdminClient, AdminUnavailable
from pdctl.options import AdminOpt, JsonOpt, admin_address, app, err, fail, message_json, out, print_json
from pdctl.views import drain_summary, migration_line


@app.command()
def migrate(
    request_id: str,
    to: Annotated[str, typer.Option("--to", help="Destination decode instance (default: the freest).")] = "",
    mode: Annotated[str, typer.Option(help="live, stop_and_copy or recompute (default: configured).")] = "",
    admin: AdminOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move a running request to another decode worker; its client stream goes on without a gap."""
    try:
        with AdminClient(admin_address(admin)) as client:
            info = client.migrate(request_id, to, mode)
    except AdminUnavailable as exc:
        fail(str(exc))
    if as_json:
        print_json(message_json(info))
    else:
        out.print(migration_line(info), highlight=False)
    if info.outcome != "moved":
        raise typer.Exit(1)


@app.command()
def cordon(instance: str, admin: AdminOpt = None, as_json: JsonOpt = False) -> None:
    """Stop sending new requests to INSTANCE (what it runs goes on)."""
    _instance_action(instance, admin, "cordon", as_json)


@app.command()
def uncordon(instance: str, admin: AdminOpt = None, as_json: JsonOpt = False) -> None:
    """Let INSTANCE take new requests again."""
    _instance_action(instance, admin, "uncordon", as_json)


def _instance_action(instance: str, admin: str | None, action: str, as_json: bool) -> None:
    try:
        with AdminClient(admin_address(admin)) as client:
            inst = getattr(client, action)(instance)
    except AdminUnavailable as exc:
        fail(str(exc))
    if as_json:
        print_json(message_json(inst))
        return
    out.print(f"{inst.instance_id}: {inst.state} ({inst.num_running} running)", highlight=False)


@app.command()
def drain(
    instance: str,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the worker to empty.")] = 300.0,
    admin: AdminOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cordon a worker and tell every front door, then empty it: a decode worker's running requests move
    away by live migration, a prefill worker's prompts finish; report when it is empty (it stays cordoned)."""
    try:
        with AdminClient(admin_address(admin)) as client, err.status(f"draining {instance} ..."):
            result = client.drain(instance, timeout)
    except AdminUnavailable as exc:
        fail(str(exc))
    if as_json:
        print_json(message_json(result))
        if result.remaining:
            raise typer.Exit(1)
        return
    for m in result.migrations:
        out.print(f"  {migration_line(m)}", highlight=False)
    summary = drain_summary(instance, result)
    if result.remaining:
        fail(f"{summary}; {result.remaining} still running after {timeout:g}s")
    out.print(f"{summary}; it is empty and cordoned", highlight=False)


@app.command()
def migrations(limit: int = 20, admin: AdminOpt = None, as_json: JsonOpt = False) -> None:
    """Migrations in flight and the most recent ones."""
    try:
        with AdminClient(admin_address(admin)) as client:
            listed = client.migrations(limit)
    except AdminUnavailable as exc:
        fail(str(exc))
    if as_json:
        print_json(message_json(listed))
        return
    for m in [*listed.in_flight, *listed.recent]:
        out.print(migration_line(m), highlight=False)
    if not listed.in_flight and not listed.recent:
        out.print("no migrations yet")
