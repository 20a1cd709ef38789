"""Live migration contracts: where a request goes, what the source hands the front door when it moved, and
the report of one migration. Frozen dataclasses that cross Ray as pickles."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from protocol.config import MigrationMode
from protocol.messages import DecodeRequest


class MigrationOutcome(enum.StrEnum):
    MOVED = "moved"  # the request continues on the destination
    FAILED = "failed"  # it stays on the source, which never stopped serving it
    FINISHED = "finished"  # it ended on the source before it could move


@dataclass(frozen=True, slots=True)
class MigrationTarget:
    instance_id: str
    actor_name: str
    kv_endpoint: str


@dataclass(frozen=True, slots=True)
class Handover:
    """The source's last word on a moved request: the front door continues it on ``target`` with
    ``continuation`` (prompt plus every token the client has, the KV parts that landed there)."""

    migration_id: str
    target: MigrationTarget
    continuation: DecodeRequest


@dataclass(frozen=True, slots=True)
class MigrationReport:
    request_id: str
    migration_id: str
    source: str
    destination: str
    mode: MigrationMode
    outcome: MigrationOutcome
    error: str = ""
    stages: int = 0  # pushes, the final one included
    blocks: int = 0
    wire_bytes: int = 0
    primed_blocks: int = 0  # pre-copied blocks the destination loaded into its prefix cache before the pause
    tokens: int = 0  # KV tokens that moved (recompute: re-run)
    paused_s: float = 0.0  # from the stream's freeze to the hand-over
    duration_s: float = 0.0
