"""The vLLM engine host's calls into its own pdflow connector, which lives in vLLM's worker process.

Two ways in. The connector's side channel (``protocol.kv_ops``), which a thread of that process answers at
once, during a step as well: migration pushes and their status, and freeing a landed transfer. vLLM's
``collective_rpc`` into the worker extension (``engine.worker_ext``), which runs in the engine core between
two steps: attach the model runner's requests, renew leases, drop pushed transfers, leak-check figures, the
connector's settings.

Also here: the leases of landed KV whose requests still wait in vLLM's queue. A queue longer than the lease
must not lose that KV, so a task renews those leases while any such request waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kv_transfer.transport.side_channel import SideChannelClient, SideChannelError
from protocol.auth import Credentials
from protocol.errors import WorkerFailed
from protocol.kv_ops import Abort, Op, Push, PushStarted, PushState, PushStatus

log = logging.getLogger(__name__)
_SIDE_CALL_DEADLINE_S = 10.0

Rpc = Callable[[str, tuple[Any, ...]], Awaitable[list[Any]]]


class ConnectorControl:
    def __init__(self, rpc: Rpc, *, lease_s: float) -> None:
        """``rpc(method, args)``: vLLM's ``collective_rpc`` to the worker extension, with a deadline."""
        self._rpc = rpc
        self._lease_s = lease_s
        self._secret = Credentials.from_env().cluster_secret  # the connector's side channel wants it
        self.address = ""  # the connector's side channel, once attached
        # this host's own side-channel calls: one thread, one client
        self._side_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdflow-side-call")
        self._side_client: SideChannelClient | None = None
        self._queued_kv: dict[str, tuple[str, ...]] = {}
        self._renewer: asyncio.Task[None] | None = None

    async def attach(self) -> str:
        """Hand the connector the model runner's request states; learn its side channel's address."""
        self.address = str((await self._rpc("pdflow_attach", ()))[0])
        return self.address

    async def push(self, op: Push) -> PushStarted:
        started: PushStarted = await self._side_call(op)
        return started

    async def push_status(self, transfer_id: str) -> PushState:
        state: PushState = await self._side_call(PushStatus(transfer_id))
        return state

    async def release_landed(self, transfer_id: str) -> None:
        """Best effort: free a landed transfer this engine will not load (idempotent where it was)."""
        try:
            await self._side_call(Abort(transfer_id, "ended unloaded"))
        except Exception as exc:
            log.debug("releasing landed transfer %s: %s", transfer_id, exc)

    async def drop_pushed(self, destination: str, transfer_ids: list[str], why: str) -> None:
        await self._rpc("pdflow_drop_pushed", (destination, transfer_ids, why))

    async def held(self) -> dict[str, int]:
        held: dict[str, int] = (await self._rpc("pdflow_kv_held", ()))[0]
        return held

    async def settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = (await self._rpc("pdflow_settings", ()))[0]
        return settings

    def hold_queued(self, request_id: str, transfer_ids: tuple[str, ...]) -> None:
        """Keep renewing the leases of ``request_id``'s landed KV until ``loaded`` says it left the queue."""
        self._queued_kv[request_id] = transfer_ids
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_queued())

    def loaded(self, request_id: str) -> None:
        self._queued_kv.pop(request_id, None)

    @property
    def queued(self) -> int:
        """Requests whose landed KV waits in vLLM's queue with its lease renewed (leak check)."""
        return len(self._queued_kv)

    def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        client, self._side_client = self._side_client, None
        if client is not None:
            self._side_thread.submit(client.close)
        self._side_thread.shutdown(wait=False)

    async def _side_call(self, op: Op) -> Any:
        if not self.address:
            raise WorkerFailed("the engine's pdflow connector is not attached")

        def call() -> Any:
            if self._side_client is None:
                self._side_client = SideChannelClient(self.address, self._secret)
            return self._side_client.ask(op, timeout_s=_SIDE_CALL_DEADLINE_S)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._side_thread, call)
        except SideChannelError as exc:
            raise WorkerFailed(f"the engine's KV connector did not answer: {exc}") from exc

    async def _renew_queued(self) -> None:
        """Renew the leases of the landed KV of requests still queued in vLLM at once, then every third of a
        lease; ends when none waits."""
        while self._queued_kv:
            ids = [tid for tids in list(self._queued_kv.values()) for tid in tids]
            try:
                lost = (await self._rpc("pdflow_renew", (ids,)))[0] if ids else []
            except Exception as exc:  # the engine is dying; its requests fail on their own
                log.warning("renewing the leases of queued KV failed: %s", exc)
                lost = []
            if lost:
                log.debug("queued KV no longer held here: %s", lost)
            await asyncio.sleep(self._lease_s / 3)
