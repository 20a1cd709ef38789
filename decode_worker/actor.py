"""The decode worker actor: decoding, and both sides of live migration. The source side is ``migrate``
(``decode_worker.migration.source``); the destination side is ``decode`` itself, since a moved request arrives
as a ``DecodeRequest`` whose KV handle names the parts that landed here, plus ``prime`` ahead of it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from decode_worker.migration.source import MigrationSource
from decode_worker.migration.stream import LiveStream, StreamRelay
from engine.worker import EngineWorker
from protocol.config import MigrationMode
from protocol.engine import MigratableEngine
from protocol.ids import RequestId
from protocol.messages import DecodeItem, DecodeRequest, MigrationTarget, SamplingSpec
from protocol.migrations import MigrationReport
from protocol.snapshots import InstanceSnapshot, Role, RunningKV

_PRIME_CALL_S = 1.0  # on top of migration.prime_timeout_s, for the call itself


class DecodeWorker(EngineWorker[MigratableEngine]):
    role = Role.DECODE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streams = StreamRelay(last_push_wait_s=self.config.migration.timeout_s)
        self.migrations = MigrationSource(
            self.engine, self.streams, self.instance_id, self.config.migration, primer=self._prime_peer
        )
        # decode workers in this process by actor name (benchmarks, in-process tests): a migration reaches
        # them directly rather than as Ray actors
        self.local_peers: dict[str, DecodeWorker] = {}

    async def decode(self, request: DecodeRequest) -> AsyncIterator[DecodeItem]:
        """Ray streaming generator: load the KV through the request's handle (prefill hand-off, or the parts
        of a migration), stream the tokens after ``first_token_id``. Cancelling the generator
        (``ray.cancel``) aborts the request in vLLM and frees its blocks. The last item either finishes the
        request (a chunk with ``finish_reason``) or hands it over to another worker (a ``Handover``)."""
        stream = LiveStream(
            request.request_id,
            (*request.prompt_token_ids, request.first_token_id),
            request.sampling,
            request.sampling.max_tokens - 1,
            priority=request.priority,
        )
        async for item in self.streams.serve(stream, self.engine.decode(request)):
            yield item

    async def release(self, request: DecodeRequest) -> None:
        """Load and drop the KV of a request that ended on the prefill worker (its first token was a stop
        token), so that the KV pushed here is freed now rather than when its lease runs out (and, with
        vLLM's NixlConnector, the prefill worker's blocks too)."""
        one_step = replace(request.sampling, max_tokens=2, ignore_eos=True, stop_token_ids=())
        async for _ in self.engine.decode(replace(request, sampling=one_step)):
            pass

    async def generate(
        self, request_id: str, prompt_token_ids: tuple[int, ...], sampling: SamplingSpec
    ) -> AsyncIterator[DecodeItem]:
        """Colocated path (prefill here too), for short prompts and for reference runs. Migratable too."""
        stream = LiveStream(RequestId(request_id), prompt_token_ids, sampling, sampling.max_tokens)
        chunks = self.engine.generate(RequestId(request_id), prompt_token_ids, sampling)
        async for item in self.streams.serve(stream, chunks):
            yield item

    async def migrate(
        self, request_id: str, migration_id: str, target: MigrationTarget, mode: str = ""
    ) -> MigrationReport:
        """Move a request served here to ``target`` (another decode worker); see
        ``decode_worker.migration.source``. Returns when it moved or failed (then it goes on here)."""
        chosen = MigrationMode(mode) if mode else self.config.migration.mode
        return await self.migrations.migrate(request_id, migration_id, target, chosen)

    async def prime(self, request: DecodeRequest) -> bool:
        """Destination side of a live migration, before its hand-over: load the pre-copied stages named by
        ``request.kv_handle`` into the prefix cache (``MigratableEngine.prime``)."""
        return await self.engine.prime(request, self.config.migration.prime_timeout_s)

    async def _prime_peer(self, target: MigrationTarget, request: DecodeRequest) -> bool:
        peer = self.local_peers.get(target.actor_name)
        if peer is not None:
            return await peer.prime(request)
        deadline = self.config.migration.prime_timeout_s + _PRIME_CALL_S
        primed: bool = await self.actors.call(target.actor_name, "prime", request, timeout_s=deadline)
        return primed

    def cancel_migration(self, request_id: str) -> bool:
        return self.migrations.cancel(request_id)

    async def leak_check(self) -> dict[str, int]:
        """``EngineWorker.leak_check`` plus the streams and migrations this worker runs."""
        figures = {
            "streams": len(self.streams.running()),
            "migrating": len(self.migrations.migrating()),
            "migration_cleanups": self.migrations.cleanups,
        }
        return await super().leak_check() | figures

    def running_requests(self) -> list[str]:
        return self.streams.running()

    def migration_phases(self) -> dict[str, str]:
        """The migrations this worker runs as their source, by request: ``MigrationSource.phases``."""
        return self.migrations.phases()

    def snapshot(self) -> InstanceSnapshot:
        running = self.streams.kv_of_running(self.engine.block_size)
        return replace(
            super().snapshot(), requests=tuple(RunningKV(RequestId(rid), *kv) for rid, *kv in running)
        )
