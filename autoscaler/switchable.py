"""The worker actor the Ray actuator runs: both roles' calls on one engine, and a role switch in place.

The engine host is role-agnostic (its KV connector sends and receives, vLLM's ``kv_both``), so switching a
worker between prefill and decode restarts nothing: once drained, it reports the other role and takes that
role's calls from its next snapshot on. That takes about a second, where starting an engine takes tens of
seconds on CPU and minutes on a GPU cluster (pulling the image and the weights). The instance keeps its id and
actor name; its role is what it reports."""

from __future__ import annotations

from typing import Any

from decode_worker.actor import DecodeWorker
from prefill_worker.actor import PrefillWorker
from protocol.errors import InvalidRequest
from protocol.snapshots import Role


class SwitchableWorker(DecodeWorker, PrefillWorker):
    def __init__(self, *args: Any, role: str = Role.DECODE.value, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.role = Role(role)

    def current_role(self) -> str:
        return self.role.value

    async def switch_role(self, role: str) -> str:
        """Serve as ``role`` from now on, and report so at once. Idempotent. Only a drained worker switches:
        raises ``InvalidRequest`` while it runs, queues or receives anything."""
        to = Role(role)
        if to is self.role:
            return to.value
        busy = self._busy()
        if busy:
            raise InvalidRequest(
                f"{self.instance_id} still holds {busy} request(s): drain it before switching its role"
            )
        self.role = to
        if self._report is not None:
            await self._report_once()
        return to.value

    def _busy(self) -> int:
        load = self.engine.load()
        return (
            load.num_running
            + load.num_waiting
            + load.in_flight
            + len(self.streams.running())
            + len(self.migrations.migrating())
        )
