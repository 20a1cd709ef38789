"""The worker actor the Ray actuator runs: both roles' calls on one engine, and a role switch in place.

The engine host is role-agnostic (its KV connector sends and receives, vLLM's ``kv_both``), so switching a
worker between prefill and decode restarts nothing: once drained, it takes the other role and reports it, and
the controller puts it back in service in the other pool. Starting an engine instead takes tens of seconds
on CPU and minutes on a GPU cluster (pulling the image and the weights). The instance keeps its id and actor
name; its role is what it reports. Either role's calls keep working on it whatever it reports, so a front
door whose snapshot is a moment old sends nothing that fails."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from decode_worker.actor import DecodeWorker
from prefill_worker.actor import PrefillWorker
from protocol.errors import InvalidRequest
from protocol.snapshots import Role

log = logging.getLogger(__name__)
_SETTLE_S = 5.0
_SETTLE_POLL_S = 0.05


class SwitchableWorker(DecodeWorker, PrefillWorker):
    def __init__(self, *args: Any, role: str = Role.DECODE.value, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.role = Role(role)
        self._announce: asyncio.Task[None] | None = None

    def current_role(self) -> str:
        return self.role.value

    def take_role(self, role: str) -> str:
        """Serve as ``role`` from now on; the next load report says so. Idempotent. Only a drained worker
        switches: raises ``InvalidRequest`` while it runs, queues or receives any request."""
        to = Role(role)
        if to is not self.role:
            busy = self._busy()
            if busy:
                raise InvalidRequest(
                    f"{self.instance_id} still holds {busy} request(s): drain it before switching its role"
                )
            self.role = to
        return to.value

    async def switch_role(self, role: str, settle_s: float = _SETTLE_S) -> str:
        """``take_role``, then report at once (in the background: a slow controller does not fail the switch,
        which has happened; the timer's reports follow either way). A request that has just moved away may
        take a moment to leave the engine: it waits up to ``settle_s`` for the worker to hold nothing."""
        deadline = time.monotonic() + settle_s
        while self._busy() and time.monotonic() < deadline:
            await asyncio.sleep(_SETTLE_POLL_S)
        taken = self.take_role(role)
        if self._report is not None:
            self._announce = asyncio.create_task(self._announce_role())
        return taken

    async def _announce_role(self) -> None:
        try:
            await self._report_once()
        except Exception as exc:  # the next timed report carries the role
            log.warning("%s: reporting the new role failed: %s", self.instance_id, exc)

    def _busy(self) -> int:
        """Requests in the engine (pdflow's own count: vLLM's running figure is from its last step, which
        may predate the last request's leaving), streams served here, migrations away from here."""
        return self.engine.load().in_flight + len(self.streams.running()) + len(self.migrations.migrating())
