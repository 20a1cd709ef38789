"""What every engine worker does besides serving: start its engine, register with the controller, push load
snapshots on a timer, answer aborts and leak checks, shut down. ``PrefillWorker`` and ``DecodeWorker`` add
their role's serving calls on top. Runs inside a Ray actor (an asyncio event loop), or in-process where a
test gives it an engine and a way to report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from engine.vllm_engine import VllmEngine
from protocol.config import ClusterConfig
from protocol.engine import ServingEngine
from protocol.ids import InstanceId, RequestId
from protocol.snapshots import InstanceSnapshot, InstanceState, Role
from runtime.actors import ActorDirectory

log = logging.getLogger(__name__)
_REPORT_DEADLINE_S = 2.0

E = TypeVar("E", bound=ServingEngine)
Reporter = Callable[[InstanceSnapshot], Awaitable[None]]


class EngineWorker(Generic[E]):
    role: Role

    def __init__(
        self,
        instance_id: str,
        actor_name: str,
        model_path: str,
        config: dict[str, Any],
        controller_name: str,
        namespace: str,
        *,
        engine: E | None = None,
        report: Reporter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """As a Ray actor: the engine is vLLM's on ``model_path`` and snapshots go to ``controller_name``
        (none: an unregistered engine, such as a reference run, reports to nobody). In-process: ``engine``
        and ``report`` replace both; ``clock`` stamps the snapshots (``reported_at``)."""
        self.instance_id = InstanceId(instance_id)
        self.actor_name = actor_name
        self.config = ClusterConfig.model_validate(config)
        self.engine: E = engine if engine is not None else self._vllm_engine(Path(model_path))
        self.actors = ActorDirectory(namespace)
        if report is None and controller_name:
            report = self._reporter(controller_name)
        self._report = report
        self._clock = clock
        self._state = InstanceState.STARTING
        self._report_task: asyncio.Task[None] | None = None
        self._reported_ok_at: float | None = None
        self._started_at = clock()  # this run of the worker (see InstanceSnapshot.started_at)
        self._hung = False  # its engine made no progress for worker.hung_timeout_s with work in flight

    def _vllm_engine(self, model_path: Path) -> Any:
        return VllmEngine(model_path, self.config.engine, self.config.kv, engine_id=self.instance_id)

    async def start(self) -> None:
        """Report STARTING, start the engine (tens of seconds on CPU), report READY. Returns once the worker
        serves. Reporting from the first moment tells the controller the instance is coming: one restarted
        under the name of a dead one takes the name over at once, instead of being removed as the dead one
        (three heartbeat timeouts of silence) while its engine starts. A failed start reports DEAD."""
        if self._report is not None:
            with contextlib.suppress(Exception):  # the controller may be starting too: the loop tries again
                await self._report_once()
            self._report_task = asyncio.create_task(self._report_loop())
        try:
            await asyncio.wait_for(self.engine.start(), self.config.worker.start_timeout_s)
        except BaseException:
            self._state = InstanceState.DEAD
            if self._report is not None:
                with contextlib.suppress(Exception):
                    await self._report_once()
            raise
        self._state = InstanceState.READY
        if self._report is not None:
            await self._report_once()

    def snapshot(self) -> InstanceSnapshot:
        load = self.engine.load()
        if self.engine.dead and self._state is not InstanceState.DEAD:
            log.error("%s: the engine died; reporting DEAD so that it gets no new work", self.instance_id)
            self._state = InstanceState.DEAD
        if load.stalled_s > self.config.worker.hung_timeout_s and not self._hung:
            self._hung = True  # for good: the pod's liveness probe fails, and the kubelet restarts it
            log.error(
                "%s: the engine is hung (%d requests, no output for %.0f s); reporting DEAD so that it gets "
                "no new work",
                self.instance_id,
                load.in_flight,
                load.stalled_s,
            )
            self._state = InstanceState.DEAD
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
            reported_at=self._clock(),
            kv_endpoint=self.engine.kv_endpoint,
            max_batch=self.config.engine.max_num_seqs,
            started_at=self._started_at,
        )

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(RequestId(request_id))

    async def leak_check(self) -> dict[str, int]:
        """What this worker still holds: KV blocks, requests, and the engine's KV exchange state (regions,
        transfers, pulls, pushes, loads). All zero when idle."""
        load = self.engine.load()
        figures = {
            "kv_blocks_used": load.kv_blocks_used,
            "requests": load.num_running + load.num_waiting + load.in_flight,
        }
        return figures | await self.engine.kv_held()

    def requests(self) -> list[str]:
        """The ids of the requests in this worker's engine (``EngineLoad.in_flight`` counts them)."""
        return list(self.engine.request_ids())

    async def kv_settings(self) -> dict[str, Any]:
        """The KV transfer settings the engine's connector runs with, as it reports them."""
        return await self.engine.kv_settings()

    def ping(self) -> str:
        return self.instance_id

    def health(self) -> dict[str, Any]:
        """What a pod's probes ask: the worker's state, whether its engine is alive, and how long ago the
        controller last took its report (None: never)."""
        ok_at = self._reported_ok_at
        return {
            "state": self._state.value,
            "engine_alive": not self.engine.dead and not self._hung,
            "reported_s_ago": None if ok_at is None else self._clock() - ok_at,
        }

    async def shutdown(self) -> None:
        """Tell the controller first, so that no new request comes here, then stop the engine."""
        self._state = InstanceState.DEAD
        if self._report_task is not None:
            self._report_task.cancel()
            with contextlib.suppress(Exception):  # the controller may be gone already
                await self._report_once()
        await self.engine.shutdown()

    def _reporter(self, controller_name: str) -> Reporter:
        async def report(snapshot: InstanceSnapshot) -> None:
            await self.actors.call(controller_name, "report", snapshot, timeout_s=_REPORT_DEADLINE_S)

        return report

    async def _report_loop(self) -> None:
        interval = self.config.worker.report_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self._report_once()
            except Exception as exc:  # the controller may be restarting; keep serving, keep trying
                log.warning("%s: load report failed: %s", self.instance_id, exc)

    async def _report_once(self) -> None:
        assert self._report is not None
        await self._report(self.snapshot())
        self._reported_ok_at = self._clock()
