"""A whole pdflow cluster in one process, with no Ray and no vLLM: the real prefill and decode worker classes
on fake engines (``engine.fake_engine``) whose KV moves through the real KV exchange over one in-process
fabric, a registry they report to, the real request router (reaching the workers through a
``LocalWorkerClient``) fed the registry's snapshots, the request log, and the migration coordinator."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from autoscaler.switchable import SwitchableWorker
from controller.migrations import MigrationCoordinator
from controller.registry import InstanceRegistry
from controller.request_log import RequestLog
from decode_worker.actor import DecodeWorker
from engine.fake_engine import FakeEngine
from engine.fake_model import LatencyModel
from frontdoor.metrics import FrontDoorMetrics
from frontdoor.router import RequestRouter
from frontdoor.workers import LocalWorkerClient
from kv_transfer.transport.fake import FakeFabric, InProcessTransport
from prefill_worker.actor import PrefillWorker
from protocol.config import ClusterConfig
from protocol.ids import RequestId
from protocol.lifecycle import RequestState
from protocol.messages import MigrationTarget, SamplingSpec, TokenChunk
from protocol.migrations import MigrationReport
from protocol.snapshots import InstanceSnapshot, RequestEvent, Role

_STAGING_BYTES = 4 << 20


class _LocalDecodeWorkers:
    """The migration coordinator's calls, made to the worker objects directly."""

    def __init__(self, workers: dict[str, Any]) -> None:
        self._workers = workers

    async def migrate(
        self, worker: str, rid: str, mid: str, target: MigrationTarget, mode: str, timeout_s: float
    ) -> MigrationReport:
        report: MigrationReport = await asyncio.wait_for(
            self._workers[worker].migrate(rid, mid, target, mode), timeout_s
        )
        return report

    async def running_requests(self, worker: str, timeout_s: float) -> list[str]:
        running: list[str] = self._workers[worker].running_requests()
        return running


class FakeCluster:
    def __init__(
        self,
        prefill: int = 1,
        decode: int = 2,
        *,
        latency: LatencyModel | None = None,
        overrides: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        switchable: bool = False,
    ) -> None:
        """``switchable``: the workers are the Ray actuator's (``SwitchableWorker``: either role, switched in
        place); otherwise ``PrefillWorker`` and ``DecodeWorker``."""
        self.switchable = switchable
        self.config = ClusterConfig.load(
            overrides={
                "worker.report_interval_s": 0.02,
                "frontdoor.prefill_timeout_s": 10,
                "frontdoor.token_timeout_s": 10,
                "kv.codec": "none",
                **(overrides or {}),
            },
            environ={},
        )
        self.fabric = FakeFabric()
        self.latency = latency or LatencyModel()
        self.registry = InstanceRegistry(
            self.config.controller.heartbeat_timeout_s, self.config.worker.start_timeout_s
        )
        self.requests = RequestLog(self.config.controller.request_history)
        self.workers: dict[str, Any] = {}
        self.engines: dict[str, FakeEngine] = {}
        self.client = LocalWorkerClient(self.workers)
        self.metrics = FrontDoorMetrics(lambda: self.router.snapshot)
        # one pair of clocks for everything that reads time: the router, the coordinator, the workers'
        # reports, the registry (monotonic), and the request events and snapshots (wall)
        self.clock, self.wall_clock = clock, wall_clock
        self.router = RequestRouter(
            self.config.frontdoor,
            self.client,
            self.metrics,
            self._event,
            max_predicted_ttft_s=self.config.max_predicted_ttft_s,
            clock=clock,
            wall_clock=wall_clock,
        )
        self.coordinator = MigrationCoordinator(
            self.registry,
            self.config.migration,
            _LocalDecodeWorkers(self.workers),
            self._decoding_on,
            clock=clock,
            wall_clock=wall_clock,
        )
        self._pools = {Role.PREFILL: prefill, Role.DECODE: decode}
        self._ids = itertools.count()

    async def start(self) -> FakeCluster:
        for role, count in self._pools.items():
            for index in range(count):
                await self.add_worker(role, index)
        return self

    async def add_worker(self, role: Role, index: int) -> Any:
        instance = f"{role.value}-{index}"
        name = f"pdflow-{instance}"
        engine = FakeEngine(
            instance,
            self.config.kv,
            transport=InProcessTransport(name, _STAGING_BYTES, self.fabric),
            latency=self.latency,
            clock=self.clock,
        )
        cls = PrefillWorker if role is Role.PREFILL else DecodeWorker
        config = self.config.model_dump(mode="json")
        kwargs: dict[str, Any] = {"engine": engine, "report": self._report, "clock": self.wall_clock}
        if self.switchable:
            cls, kwargs["role"] = SwitchableWorker, role.value
        worker = cls(instance, name, "", config, "", "pdflow", **kwargs)
        self.workers[name], self.engines[name] = worker, engine
        await worker.start()
        if isinstance(worker, DecodeWorker):  # a migration primes its destination in this process
            for other in self.workers.values():
                if isinstance(other, DecodeWorker):
                    other.local_peers = {n: w for n, w in self.workers.items() if isinstance(w, DecodeWorker)}
        return worker

    async def stop(self) -> None:
        await self.client.settled()
        for worker in list(self.workers.values()):
            await worker.shutdown()

    async def __aenter__(self) -> FakeCluster:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def worker(self, instance: str) -> Any:
        return self.workers[f"pdflow-{instance}"]

    async def stream(
        self,
        prompt: tuple[int, ...],
        max_tokens: int,
        *,
        request_id: str = "",
        priority: int = 0,
        **sampling: Any,
    ) -> AsyncIterator[TokenChunk]:
        rid = RequestId(request_id or f"r{next(self._ids)}")
        spec = SamplingSpec(max_tokens=max_tokens, temperature=0.0, **sampling)
        async with contextlib.aclosing(self.router.generate(rid, prompt, spec, priority)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def generate(self, prompt: tuple[int, ...], max_tokens: int, **kw: Any) -> tuple[list[int], str]:
        tokens, finish = [], ""
        async for chunk in self.stream(prompt, max_tokens, **kw):
            tokens.extend(chunk.token_ids)
            finish = chunk.finish_reason.value if chunk.finish_reason else finish
        return tokens, finish

    def states(self, request_id: str) -> list[RequestState]:
        record = self.requests.get(request_id)
        return [e.state for e in record.events] if record is not None else []

    async def leaks(self) -> dict[str, dict[str, int]]:
        """What any worker still holds (its leak check, zero figures left out) and the migrations in
        flight, after the fire-and-forget calls made so far."""
        await self.client.settled()
        held = {name: await w.leak_check() for name, w in self.workers.items()}
        held["controller"] = {"migrations_in_flight": len(self.coordinator.in_flight())}
        held["frontdoor"] = {"requests_in_flight": sum(self.router.in_flight().values())}
        return {name: nonzero for name, of in held.items() if (nonzero := {k: v for k, v in of.items() if v})}

    async def wait_idle(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while held := await self.leaks():
            assert time.monotonic() < deadline, f"still held after {timeout_s} s: {held}"
            await asyncio.sleep(0.01)

    async def wait_for(self, what: str, cond: Any, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}"
            await asyncio.sleep(0.005)

    async def _report(self, snapshot: InstanceSnapshot) -> None:
        self.registry.report(snapshot, self.clock())
        self.router.update_snapshot(self.registry.snapshot(self.wall_clock()))

    def _event(self, event: RequestEvent, prompt_tokens: int, output_tokens: int) -> None:
        self.requests.apply(event, prompt_tokens, output_tokens)

    def _decoding_on(self, request_id: str) -> str | None:
        record = self.requests.get(request_id)
        if record is None or record.state not in (RequestState.DECODING, RequestState.MIGRATING):
            return None
        return record.decode_instance
