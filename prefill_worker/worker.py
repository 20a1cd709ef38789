"""What every engine worker does besides serving: start its engine, register with the controller, push load
snapshots on a timer, answer aborts, shut down. ``PrefillWorker`` and ``DecodeWorker`` add their role's
serving calls on top. Runs inside a Ray actor (an asyncio event loop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from prefill_worker.engine import VllmEngine
from protocol.config import ClusterConfig
from protocol.ids import InstanceId, RequestId
from protocol.snapshots import InstanceSnapshot, InstanceState, Role

log = logging.getLogger(__name__)
_REPORT_DEADLINE_S = 2.0


class EngineWorker:
    role: Role

    def __init__(
        self,
        instance_id: str,
        actor_name: str,
        model_path: str,
        config: dict[str, Any],
        controller_name: str,
        namespace: str,
    ) -> None:
        self.instance_id = InstanceId(instance_id)
        self.actor_name = actor_name
        self.config = ClusterConfig.model_validate(config)
        self.engine = VllmEngine(Path(model_path), self.config.engine, engine_id=instance_id)
        self._controller_name = controller_name
        self._namespace = namespace
        self._state = InstanceState.STARTING
        self._report_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the engine (tens of seconds on CPU), then begin reporting. Returns once the worker serves."""
        await asyncio.wait_for(self.engine.start(), self.config.worker.start_timeout_s)
        self._state = InstanceState.READY
        if self._controller_name:  # an unregistered engine (a reference run) reports to nobody
            self._report_task = asyncio.create_task(self._report_loop())
            await self._report_once()

    def snapshot(self) -> InstanceSnapshot:
        if self.engine.dead and self._state is not InstanceState.DEAD:
            log.error(
                "%s: the vLLM engine died; reporting DEAD so that it gets no new work", self.instance_id
            )
            self._state = InstanceState.DEAD
        load = self.engine.load()
        return InstanceSnapshot(
            instance_id=self.instance_id,
            role=self.role,
            state=self._state,
            actor_name=self.actor_name,
            num_running=load.num_running,
            num_waiting=load.num_waiting,
            kv_blocks_used=load.kv_blocks_used,
            kv_blocks_total=load.kv_blocks_total,
            decode_tps=load.decode_tps,
            prompt_tps=load.prompt_tps,
            in_flight=load.in_flight,
            transfer=load.transfer,
            reported_at=time.time(),
            kv_endpoint=self.engine.kv_endpoint,
            max_batch=self.config.engine.max_num_seqs,
        )

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(RequestId(request_id))

    async def leak_check(self) -> dict[str, int]:
        """What this worker still holds: KV blocks, requests, and the KV connector's staging state (regions,
        transfers, pushes, loads). All zero when idle."""
        load = self.engine.load()
        figures = {
            "kv_blocks_used": load.kv_blocks_used,
            "requests": load.num_running + load.num_waiting + load.in_flight,
        }
        return figures | await self.engine.kv_held()

    def ping(self) -> str:
        return self.instance_id

    async def shutdown(self) -> None:
        """Tell the controller first, so that no new request comes here, then stop the engine."""
        self._state = InstanceState.DEAD
        if self._report_task is not None:
            self._report_task.cancel()
            with contextlib.suppress(Exception):  # the controller may be gone already
                await self._report_once()
        await self.engine.shutdown()

    async def _report_loop(self) -> None:
        interval = self.config.worker.report_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self._report_once()
            except Exception as exc:  # the controller may be restarting; keep serving, keep trying
                log.warning("%s: load report failed: %s", self.instance_id, exc)

    async def _report_once(self) -> None:
        import ray

        controller = ray.get_actor(self._controller_name, namespace=self._namespace)
        await asyncio.wait_for(controller.report.remote(self.snapshot()), _REPORT_DEADLINE_S)
