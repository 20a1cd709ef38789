"""``pdctl`` commands for the autoscaler: ``autoscaler status | explain | pause | resume``, ``scale`` (a
manual target for both pools; pauses the policy) and ``set-role`` (switch one instance to the other pool)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.table import Table

from pdctl.admin_client import AdminClient, AdminUnavailable
from pdctl.options import AdminOpt, JsonOpt, admin_address, app, fail, message_json, out, print_json
from protocol.proto import admin_pb2

autoscaler_app = typer.Typer(no_args_is_help=True, help="The autoscaler: what it sees, what it decided, why.")
app.add_typer(autoscaler_app, name="autoscaler")
_ACTION_DEADLINE_S = 900.0  # a drain (bounded by migration.timeout_s x 4) and actuator calls


@autoscaler_app.command("status")
def autoscaler_status(admin: AdminOpt = None, as_json: JsonOpt = False) -> None:
    """Desired, ready, pending and draining instances per pool, the metric it scales on, its last decision."""
    st = _ask(admin, lambda c: c.autoscaler())
    if as_json:
        print_json(message_json(st))
        return
    state = f"[yellow]paused[/]: {st.paused}" if st.paused else "[green]active[/]"
    out.print(f"autoscaler ({st.actuator or 'no actuator'}): {state}", highlight=False)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("pool", "desired", "ready", "pending", "draining"):
        table.add_column(col, justify="left" if col == "pool" else "right")
    for pool in st.pools:
        table.add_row(pool.role, str(pool.desired), str(pool.ready), str(pool.pending), str(pool.draining))
    out.print(table)
    out.print(
        f"decode {st.decode_tps:.1f} tok/s · cache-miss prefill {st.prefill_miss_tps:.1f} tok/s",
        highlight=False,
    )
    if st.decisions_by_reason:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(st.decisions_by_reason.items()))
        out.print(f"decisions: {counts}", highlight=False)
    if st.HasField("last"):
        out.print("last decision:", highlight=False)
        _render_decision(st.last)


@autoscaler_app.command("explain")
def autoscaler_explain(
    limit: Annotated[int, typer.Option(help="Most recent N decisions.")] = 10,
    all_: Annotated[bool, typer.Option("--all", help="Also the decisions that changed nothing.")] = False,
    admin: AdminOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The autoscaler's recent decisions, newest first: the reason, the inputs it saw, what it did."""
    resp = _ask(admin, lambda c: c.autoscaler_decisions(limit, not all_))
    if as_json:
        print_json(message_json(resp))
        return
    if not resp.decisions:
        out.print("no decisions yet" + ("" if all_ else " that changed anything (--all shows every one)"))
    for d in resp.decisions:
        _render_decision(d)


@autoscaler_app.command("pause")
def autoscaler_pause(
    reason: Annotated[str, typer.Option(help="Why (shown in status).")] = "paused by an operator",
    admin: AdminOpt = None,
) -> None:
    """Stop the policy from acting (what it is doing now finishes)."""
    st = _ask(admin, lambda c: c.pause_autoscaler(reason))
    out.print(f"autoscaler paused: {st.paused}", highlight=False)


@autoscaler_app.command("resume")
def autoscaler_resume(admin: AdminOpt = None) -> None:
    """Let the policy act again (lifts a manual target and a manual override)."""
    _ask(admin, lambda c: c.resume_autoscaler())
    out.print("autoscaler active")


@app.command()
def scale(
    prefill: Annotated[int, typer.Option(help="Prefill instances.")],
    decode: Annotated[int, typer.Option(help="Decode instances.")],
    admin: AdminOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Bring the pools to a manual target (drained victims go at once); pauses the autoscaler's policy
    until `pdctl autoscaler resume`."""
    d = _ask(admin, lambda c: c.scale(prefill, decode, _ACTION_DEADLINE_S))
    if as_json:
        print_json(message_json(d))
    else:
        _render_decision(d)


@app.command("set-role")
def set_role(
    instance: str,
    role: Annotated[str, typer.Argument(help="prefill or decode")],
    admin: AdminOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Switch INSTANCE to the other pool: drain it, then serve in ROLE (in place on Ray: the engine keeps
    running; on Kubernetes the pod is replaced by one in the other pool)."""
    if role not in ("prefill", "decode"):
        fail(f"ROLE must be 'prefill' or 'decode', not {role!r}")
    d = _ask(admin, lambda c: c.set_role(instance, role, _ACTION_DEADLINE_S))
    if as_json:
        print_json(message_json(d))
    else:
        _render_decision(d)


def _ask(admin: str | None, call):  # type: ignore[no-untyped-def]
    try:
        with AdminClient(admin_address(admin)) as client:
            return call(client)
    except AdminUnavailable as exc:
        fail(str(exc))


def _render_decision(d: admin_pb2.ScaleDecisionInfo) -> None:
    from datetime import datetime

    at = datetime.fromtimestamp(d.at).strftime("%H:%M:%S") if d.at else "-"
    who = "manual" if d.manual else d.reason
    out.print(f"[bold]#{d.decision_id}[/bold] {at} {who} -> {d.prefill}P+{d.decode}D", highlight=False)
    out.print(f"  {d.detail}", highlight=False)
    latency = []
    if d.ttft_p99_seconds >= 0:
        latency.append(f"TTFT p99 {d.ttft_p99_seconds * 1000:.0f} ms")
    if d.tpot_p99_seconds >= 0:
        latency.append(f"TPOT p99 {d.tpot_p99_seconds * 1000:.0f} ms")
    if latency:
        out.print("  " + ", ".join(latency), highlight=False)
    for name, items in (
        ("victims", d.victims),
        ("put back", d.restore),
        ("role switches", d.flips),
        ("cancelled", d.cancel),
        ("removed", d.remove),
    ):
        if items:
            out.print(f"  {name}: {', '.join(items)}", highlight=False)
    for action in d.actions:
        out.print(f"  - {action}", highlight=False)
