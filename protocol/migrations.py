"""The report of one live migration, as its source returns it to the controller. (Where a request goes and
what the front door gets when it moved, ``MigrationTarget`` and ``Handover``, are request messages:
``protocol.messages``.)"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from protocol.config import MigrationMode


class MigrationOutcome(enum.StrEnum):
    MOVED = "moved"  # the request continues on the destination
    FAILED = "failed"  # it stays on the source, which never stopped serving it
    FINISHED = "finished"  # it ended on the source before it could move


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
