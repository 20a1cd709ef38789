"""The prefill worker actor."""

from __future__ import annotations

from prefill_worker.worker import EngineWorker
from protocol.messages import PrefillRequest, PrefillResult
from protocol.snapshots import Role


class PrefillWorker(EngineWorker):
    role = Role.PREFILL

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        """Compute the prompt and token one. The KV stays here until a decode worker pulls it, or until the
        lease (``engine.kv_lease_seconds``) runs out with no decode worker asking."""
        return await self.engine.prefill(request)

    async def drop_handoff(self, request_id: str, destination: str) -> None:
        """Have ``destination`` (a decode worker's KV endpoint) free the KV pushed for ``request_id``, which
        it will never load (the request ended before its decode worker produced a token)."""
        await self.engine.drop_handoff(destination, request_id)
