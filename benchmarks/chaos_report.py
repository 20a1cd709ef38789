"""The tables ``benchmarks/chaos.py`` prints from its result: one row per fault, then the goals."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console(width=None if sys.stdout.isatty() else 160)


def report(r: dict[str, Any]) -> bool:
    table = Table(title="faults at every stage: what the requests in flight got")
    for col in (
        "victim / stage / fault",
        "reached",
        "requests met",
        "completed",
        "typed errors",
        "untyped",
        "hung",
        "wrong tokens",
        "TTFT p50 / max",
    ):
        table.add_column(col, justify="left" if col.startswith("victim") else "right")
    for label, c in r["cells"].items():
        table.add_row(
            label,
            f"{c.get('reached', 0)}/{c.get('trials', 0)}",
            str(c.get("met", 0)),
            str(c.get("completed", 0)),
            str(c.get("typed", 0)),
            str(c.get("untyped", 0)),
            str(c.get("hung", 0)),
            str(c.get("wrong", 0)),
            f"{c['ttft_p50_ms']} / {c['ttft_max_ms']} ms" if "ttft_p50_ms" in c else "-",
        )
    console.print(table)
    share = r["recoverable_completed"] / max(1, r["met_a_recoverable_fault"])
    goals = Table(title=f"{r['requests']} requests; {r['met_a_fault']} met a fault")
    for col in ("goal", "measured", "target"):
        goals.add_column(col)
    checks = [
        ("requests", str(r["requests"]), ">= 1000", r["requests"] >= 1000),
        ("hung", str(r["hung"]), "0", r["hung"] == 0),
        (
            "wrong tokens (resumed streams checked)",
            f"{r['wrong_tokens']} ({r['resumed']} resumed)",
            "0",
            r["wrong_tokens"] == 0,
        ),
        ("untyped failures", str(r["untyped_failures"]), "0", r["untyped_failures"] == 0),
        (
            "recoverable fault met, completed",
            f"{r['recoverable_completed']}/{r['met_a_recoverable_fault']} ({share:.1%})",
            ">= 99%",
            share >= 0.99,
        ),
        ("held afterwards", json.dumps(r["leaks"]) if r["leaks"] else "nothing", "nothing", not r["leaks"]),
    ]
    for goal, measured, target, ok in checks:
        goals.add_row(goal, measured, target, style=None if ok else "red")
    console.print(goals)
    console.print(
        f"failures by kind: {dict(r['errors'])}; sent while a fault was being recovered from: "
        f"{r['during_recovery_completed']}/{r['during_recovery']} completed (the others: "
        f"{dict(r['during_recovery_errors'])}); others that failed: {r['untouched_failed']}"
    )
    return all(ok for *_, ok in checks)
