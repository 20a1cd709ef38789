"""The prefill worker actor."""

from __future__ import annotations

from engine.worker import EngineWorker
from protocol.engine import ServingEngine
from protocol.messages import PrefillRequest, PrefillResult
from protocol.snapshots import Role


class PrefillWorker(EngineWorker[ServingEngine]):
    role = Role.PREFILL

    async def prefill(self, request: PrefillRequest) -> PrefillResult:
        """Compute the prompt and token one, and hand its KV to the decode worker the request names (pushed
        by pdflow's connector before this returns; with vLLM's NixlConnector, held here until that worker
        pulls it or ``kv.lease_seconds`` pass)."""
        return await self.engine.prefill(request)

    async def drop_handoff(self, request_id: str, destination: str) -> None:
        """Have ``destination`` (a decode worker's KV endpoint) free the KV pushed for ``request_id``, which
        it will never load (the request ended before its decode worker produced a token)."""
        await self.engine.drop_handoff(destination, request_id)
