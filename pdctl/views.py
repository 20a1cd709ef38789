"""Tables that pdctl prints."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from google.protobuf.json_format import MessageToDict
from rich import box
from rich.console import Console
from rich.table import Table

from protocol.proto import admin_pb2


def status_dict(st: admin_pb2.ClusterStatus) -> dict[str, Any]:
    return MessageToDict(st, always_print_fields_with_no_presence=True)


def render_status(console: Console, st: admin_pb2.ClusterStatus) -> None:
    table = Table(
        title=f"pdflow · {st.model}",
        caption=f"HTTP {st.http_address or '-'} · gRPC {st.grpc_address or '-'}",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for col, justify in (
        ("instance", "left"),
        ("role", "left"),
        ("state", "left"),
        ("run", "right"),
        ("wait", "right"),
        ("KV", "right"),
        ("blocks", "right"),
        ("tok/s", "right"),
        ("KV in MB", "right"),
        ("seen", "right"),
    ):
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for inst in st.instances:
        usage = inst.kv_blocks_used / inst.kv_blocks_total if inst.kv_blocks_total else 0.0
        state_style = {"READY": "green", "DEAD": "red"}.get(inst.state, "yellow")
        table.add_row(
            inst.instance_id,
            inst.role,
            f"[{state_style}]{inst.state}[/]",
            str(inst.num_running),
            str(inst.num_waiting),
            f"{usage:.0%}",
            f"{inst.kv_blocks_used}/{inst.kv_blocks_total}",
            f"{inst.decode_tps:.1f}",
            f"{inst.transfer.bytes / 1e6:.1f}",
            f"{inst.seconds_since_report:.1f}s",
        )
    console.print(table)
    if st.requests_by_state:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(st.requests_by_state.items()))
        console.print(f"requests seen: {counts}", highlight=False)
    for m in st.migrations_in_flight:
        console.print(f"migrating: {migration_line(m)}", highlight=False)


def migration_line(m: admin_pb2.MigrationInfo) -> str:
    """One migration as a sentence: who moved where, how, and (once done) what it cost."""
    line = f"{m.request_id} {m.source} -> {m.destination} ({m.mode}, {m.trigger}, {m.migration_id})"
    if not m.outcome:
        return line + f", running for {max(0.0, time.time() - m.started_at):.1f}s"
    line += (
        f": {m.outcome} in {m.duration_seconds * 1e3:.0f} ms, stream paused {m.paused_seconds * 1e3:.0f} ms, "
        f"{m.stages} push(es), {m.blocks} blocks ({m.primed_blocks} primed), {m.wire_bytes / 1e6:.1f} MB"
    )
    return line + (f"; {m.error}" if m.error else "")


def render_requests(
    console: Console, requests: Iterable[admin_pb2.RequestInfo], *, events: bool = False
) -> None:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("request", "state", "prefill", "decode", "prompt", "output"):
        table.add_column(col, no_wrap=True)
    rows = list(requests)
    for r in rows:
        table.add_row(
            r.request_id,
            r.state,
            r.prefill_instance,
            r.decode_instance,
            str(r.prompt_tokens),
            str(r.output_tokens),
        )
    console.print(table)
    if events:
        for r in rows:
            start = r.events[0].at if r.events else 0.0
            for e in r.events:
                when = time.strftime("%H:%M:%S", time.localtime(e.at))
                detail = f"  {e.detail}" if e.detail else ""
                console.print(
                    f"  {when}  +{(e.at - start) * 1000:8.1f} ms  {e.state}{detail}", highlight=False
                )
            if r.HasField("transfer"):
                console.print(f"  KV transfer: {transfer_line(r.transfer)}", highlight=False)


def transfer_line(t: admin_pb2.TransferInfo) -> str:
    ratio = t.wire_bytes / t.raw_bytes if t.raw_bytes else 1.0
    line = (
        f"{t.outcome}, codec {t.codec} ({t.reason}); {t.raw_bytes / 1e6:.2f} MB raw, "
        f"{t.wire_bytes / 1e6:.2f} MB on the wire ({ratio:.3f}); encode {t.encode_seconds * 1e3:.1f} ms, "
        f"wire {t.wire_seconds * 1e3:.1f} ms (tail after prefill {t.tail_seconds * 1e3:.1f} ms), "
        f"decode {t.decode_seconds * 1e3:.1f} ms"
    )
    if t.retries:
        line += f"; {t.retries} layer resend(s)"
    return line + (f"; {t.error}" if t.error else "")


def drain_summary(instance: str, result: admin_pb2.DrainResponse) -> str:
    return (
        f"{instance}: {result.moved} moved, {result.finished} finished there, {result.failed} failed "
        f"attempts, in {result.seconds:.1f}s"
    )
