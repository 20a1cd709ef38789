"""Migration coordination in the controller: start a migration on the source worker (manual, drain, or the
policy's), keep the ones in flight and the recent reports, count them for the metrics, and drain a worker
(cordon it, then move every request it runs until it runs none). The mechanism itself lives in the decode
workers; the choices come from the migration policy (``policy.migration``: a drain is its DRAIN intents);
this side only asks, calls with a deadline, and records."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from controller.registry import InstanceRegistry
from policy.migration import (
    MigrationIntent,
    MigrationState,
    MigrationTrigger,
    RunningRequest,
    choose_destination,
)
from policy.migration import decide as decide_migrations
from protocol.config import MigrationConfig, MigrationMode
from protocol.errors import InvalidRequest
from protocol.ids import InstanceId, RequestId
from protocol.messages import MigrationTarget
from protocol.migrations import MigrationOutcome, MigrationReport
from protocol.snapshots import PAUSE_BUCKETS_S, InstanceSnapshot, InstanceState, MigrationTotals, Role

log = logging.getLogger(__name__)
_RECENT = 200
_DRAIN_POLL_S = 0.2
_DRAIN_TRIES = 3  # attempts to move one request off a draining worker; then it may finish there
_LIST_CALL_S = 10.0


Inbound = Callable[[], Awaitable[int]]  # requests still on their way to an instance (the front doors' count)


class DecodeWorkers(Protocol):
    """The calls the coordinator makes to decode workers (by actor name); each raises on a dead worker or
    a missed deadline."""

    async def migrate(
        self,
        worker: str,
        request_id: str,
        migration_id: str,
        target: MigrationTarget,
        mode: str,
        timeout_s: float,
    ) -> MigrationReport: ...

    async def running_requests(self, worker: str, timeout_s: float) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class MigrationEntry:
    """A migration the controller started: in flight until ``report`` is set."""

    request_id: str
    migration_id: str
    source: str
    destination: str
    mode: MigrationMode
    trigger: MigrationTrigger
    started_at: float  # unix seconds
    report: MigrationReport | None = None


@dataclass
class DrainResult:
    moved: int = 0
    failed: int = 0
    finished: int = 0
    remaining: int = 0
    seconds: float = 0.0
    migrations: list[MigrationEntry] = field(default_factory=list)


@dataclass
class MigrationCounters:
    """Cumulative, for the metrics: count by (trigger, outcome), bytes moved, pauses of the moved ones."""

    counts: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    wire_bytes: int = 0
    paused_buckets: list[int] = field(default_factory=lambda: [0] * len(PAUSE_BUCKETS_S))
    paused_count: int = 0
    paused_sum_s: float = 0.0

    def observe_pause(self, seconds: float) -> None:
        for i, bound in enumerate(PAUSE_BUCKETS_S):
            if seconds <= bound:
                self.paused_buckets[i] += 1
        self.paused_count += 1
        self.paused_sum_s += seconds

    def totals(self) -> MigrationTotals:
        """Every (trigger, outcome) is there from the start, at 0 (the metrics' series exist before the first
        migration, so a dashboard's rate sees it)."""
        every = {(t.value, o.value): 0 for t in MigrationTrigger for o in MigrationOutcome}
        return MigrationTotals(
            counts=tuple((t, o, n) for (t, o), n in sorted((every | dict(self.counts)).items())),
            wire_bytes=self.wire_bytes,
            paused_buckets=tuple(self.paused_buckets),
            paused_count=self.paused_count,
            paused_sum_s=self.paused_sum_s,
        )


class MigrationCoordinator:
    def __init__(
        self,
        registry: InstanceRegistry,
        config: MigrationConfig,
        workers: DecodeWorkers,
        locate: Callable[[str], str | None],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``locate`` gives the decode instance a request is on as far as the request log knows (None if not
        decoding); ``clock`` times migrations and the policy's cooldowns, ``wall_clock`` stamps entries."""
        self._registry = registry
        self._config = config
        self._workers = workers
        self._locate = locate
        self._clock = clock
        self._wall_clock = wall_clock
        self._ids = itertools.count(1)
        self._in_flight: dict[str, MigrationEntry] = {}
        self._recent: collections.deque[MigrationEntry] = collections.deque(maxlen=_RECENT)
        self.counters = MigrationCounters()
        self._policy_state = MigrationState()
        self._draining: set[str] = set()  # instances a drain is emptying (cordoned ones only stop taking)
        self._planned_tasks: set[asyncio.Task[MigrationEntry | None]] = set()
        # requests that left a worker (moved, or finished) since its last load report: request id -> (that
        # worker, when, on the registry's clock); the policy must not plan them from its stale report
        self._left: dict[str, tuple[str, float]] = {}

    def in_flight(self) -> list[MigrationEntry]:
        return list(self._in_flight.values())

    def recent(self, limit: int = 50) -> list[MigrationEntry]:
        return list(itertools.islice(reversed(self._recent), limit))

    async def migrate(
        self,
        request_id: str,
        to_instance: str = "",
        *,
        source: str = "",
        mode: str = "",
        trigger: MigrationTrigger = MigrationTrigger.MANUAL,
    ) -> MigrationEntry:
        """Move ``request_id`` (from ``source``, or wherever the request log says it decodes) to
        ``to_instance`` (or the freest other decode worker). ``InvalidRequest`` for a request or instance
        that cannot take part; otherwise the entry with its report, whatever the outcome."""
        chosen = MigrationMode(mode) if mode else self._config.mode
        src_id = source or self._locate(request_id)
        if not src_id:
            raise InvalidRequest(f"request {request_id!r} is not decoding anywhere", param="request_id")
        src = self._decode_instance(src_id, "source")
        if to_instance:
            dst = self._decode_instance(to_instance, "destination")
        else:
            dst = choose_destination(self._registry.snapshot(self._wall_clock()), src_id)
        if dst.instance_id == src.instance_id:
            raise InvalidRequest("the destination is the request's own worker", param="to_instance")
        if not dst.state.schedulable:
            raise InvalidRequest(
                f"decode worker {dst.instance_id} is {dst.state.value} and takes no requests",
                param="to_instance",
            )
        if not dst.kv_endpoint:
            raise InvalidRequest(f"decode worker {dst.instance_id} has no KV endpoint (pdflow connector off)")
        if any(e.request_id == request_id for e in self._in_flight.values()):
            raise InvalidRequest(f"request {request_id!r} is already migrating", param="request_id")
        migration_id = f"m{next(self._ids)}"
        entry = MigrationEntry(
            request_id, migration_id, src.instance_id, dst.instance_id, chosen, trigger, self._wall_clock()
        )
        self._in_flight[migration_id] = entry
        target = MigrationTarget(dst.instance_id, dst.actor_name, dst.kv_endpoint)
        try:
            report = await self._workers.migrate(
                src.actor_name, request_id, migration_id, target, chosen.value, self._config.timeout_s + 5.0
            )
        except Exception as exc:  # the source died or did not answer in time
            error = f"source {src.instance_id} did not report: {str(exc).strip()[:300] or type(exc).__name__}"
            report = MigrationReport(
                request_id,
                migration_id,
                src.instance_id,
                dst.instance_id,
                chosen,
                MigrationOutcome.FAILED,
                error,
            )
        finally:
            self._in_flight.pop(migration_id, None)
            self._policy_state = self._policy_state.finished(RequestId(request_id))
        if report.outcome is not MigrationOutcome.FAILED:
            self._left[request_id] = (src.instance_id, self._clock())
        self._forget_reported()
        done = replace(entry, report=report)
        self._recent.append(done)
        self.counters.counts[(str(trigger), report.outcome.value)] += 1
        if report.outcome is MigrationOutcome.MOVED:
            self.counters.wire_bytes += report.wire_bytes
            self.counters.observe_pause(report.paused_s)
        return done

    async def policy_loop(self) -> None:
        """With ``migration.auto``: run the migration policy on every policy interval and start what it plans
        (load balance, de-fragmentation, priority headroom, the moves of a drain in progress)."""
        while True:
            await asyncio.sleep(self._config.policy_interval_s)
            try:
                self._plan_once()
            except Exception:  # one bad round must not stop the loop
                log.exception("migration policy round failed")

    def _plan_once(
        self, *, drains_only: bool = False, exclude: frozenset[str] = frozenset()
    ) -> list[asyncio.Task[MigrationEntry | None]]:
        """One round of the policy over the registry's snapshot; start every migration it plans. With
        ``drains_only`` it plans only the moves that empty draining workers; requests in ``exclude`` stay
        put."""
        snapshot = self._registry.snapshot(self._wall_clock())
        busy = {e.request_id for e in self._in_flight.values()}
        self._forget_reported()
        requests = [
            RunningRequest(r.request_id, inst.instance_id, r.priority, r.kv_blocks, r.kv_blocks)
            for inst in snapshot.instances
            if inst.role is Role.DECODE
            for r in inst.requests
            if r.request_id not in exclude and self._left.get(r.request_id, ("", 0.0))[0] != inst.instance_id
        ]
        draining = frozenset(InstanceId(i) for i in self._draining)
        # an infinite trigger gap leaves only the DRAIN moves (the policy balances nothing else)
        config = (
            self._config.model_copy(update={"trigger_gap": float("inf")}) if drains_only else self._config
        )
        plan, self._policy_state = decide_migrations(
            snapshot, requests, self._policy_state, config, self._clock(), draining
        )
        started = [asyncio.create_task(self._planned(i)) for i in plan.intents if i.request_id not in busy]
        for task in started:  # the loop keeps only weak references to tasks
            self._planned_tasks.add(task)
            task.add_done_callback(self._planned_tasks.discard)
        return started

    async def _planned(self, intent: MigrationIntent) -> MigrationEntry | None:
        try:
            return await self.migrate(
                intent.request_id, intent.destination, source=intent.source, trigger=intent.trigger
            )
        except InvalidRequest as err:  # it finished, or moved, since the snapshot
            log.info("policy migration of %s skipped: %s", intent.request_id, err.message)
            self._policy_state = self._policy_state.finished(intent.request_id)
            return None

    def _forget_reported(self) -> None:
        """Drop what ``_left`` knows of workers that reported since (or are gone from the registry)."""
        heard = self._registry.heard_at
        self._left = {
            rid: (w, at) for rid, (w, at) in self._left.items() if (h := heard(w)) is not None and h <= at
        }

    def cordon(self, instance_id: str) -> InstanceSnapshot:
        self._known(instance_id)
        return self._registry.cordon(instance_id)

    def uncordon(self, instance_id: str) -> InstanceSnapshot:
        self._known(instance_id)
        return self._registry.uncordon(instance_id)

    async def drain(
        self, instance_id: str, timeout_s: float = 0.0, inbound: Inbound | None = None
    ) -> DrainResult:
        """Cordon ``instance_id``, then migrate every request it runs to the other decode workers until it
        runs none (requests that finish meanwhile count as finished) or ``timeout_s`` passes. With
        ``inbound`` (the requests still on their way to it: prefilling for it, or being handed over), the
        drain also waits until none is left, and moves them once they arrive."""
        src = self._decode_instance(instance_id, "instance")
        self._registry.cordon(instance_id)
        self._draining.add(instance_id)
        try:
            return await self._empty(src, timeout_s, inbound)
        finally:
            self._draining.discard(instance_id)

    async def _empty(self, src: InstanceSnapshot, timeout_s: float, inbound: Inbound | None) -> DrainResult:
        """Move what ``src`` runs away, round after round of the policy's DRAIN moves (within
        ``max_concurrent``), until it runs nothing, nothing is on its way to it, or ``timeout_s`` passes.
        A request that failed to move ``_DRAIN_TRIES`` times is tried once by recompute (the destination
        re-runs it), then left to finish there."""
        started = self._clock()
        deadline = started + (timeout_s or self._config.timeout_s * 4)
        result = DrainResult()
        tried: collections.Counter[str] = collections.Counter()
        recomputed: set[str] = set()
        while True:
            coming = await inbound() if inbound is not None else 0  # first: what arrives after is listed
            coming += sum(1 for e in self._in_flight.values() if e.destination == src.instance_id)
            running = await self._workers.running_requests(src.actor_name, _LIST_CALL_S)
            if not running and not coming:
                break
            if self._clock() > deadline:
                result.remaining = len(running) + coming
                break
            exhausted = frozenset(rid for rid, n in tried.items() if n >= _DRAIN_TRIES)
            fallback = [rid for rid in running if rid in exhausted and rid not in recomputed]
            recomputed.update(fallback)
            entries = await asyncio.gather(
                *self._plan_once(drains_only=True, exclude=exhausted),
                *(self._recompute(rid, src.instance_id) for rid in fallback),
                return_exceptions=True,
            )
            mine = [e for e in entries if isinstance(e, MigrationEntry) and e.source == src.instance_id]
            if not mine:  # nothing moved yet (on its way, not reported, no room elsewhere, left to finish)
                await asyncio.sleep(_DRAIN_POLL_S)
                continue
            for entry in mine:
                tried[entry.request_id] += 1
                result.migrations.append(entry)
                assert entry.report is not None
                if entry.report.outcome is MigrationOutcome.MOVED:
                    result.moved += 1
                elif entry.report.outcome is MigrationOutcome.FINISHED:
                    result.finished += 1
                else:
                    await asyncio.sleep(_DRAIN_POLL_S)  # a failed attempt: give the worker a moment
        result.failed = sum(
            1 for e in result.migrations if e.report and e.report.outcome is MigrationOutcome.FAILED
        )
        result.seconds = self._clock() - started
        return result

    async def _recompute(self, request_id: str, source: str) -> MigrationEntry | None:
        """The last resort of a drain for a request live migration could not move: re-run it elsewhere."""
        try:
            return await self.migrate(
                request_id, source=source, mode=MigrationMode.RECOMPUTE.value, trigger=MigrationTrigger.DRAIN
            )
        except InvalidRequest as err:  # it finished meanwhile, or no destination takes it
            log.info("recompute migration of %s skipped: %s", request_id, err.message)
            return None

    async def running_on(self, instance_id: str) -> list[str]:
        """The requests decode worker ``instance_id`` runs, by its own account."""
        inst = self._decode_instance(instance_id, "instance")
        return await self._workers.running_requests(inst.actor_name, _LIST_CALL_S)

    def _known(self, instance_id: str) -> InstanceSnapshot:
        found = self._registry.snapshot(self._wall_clock()).by_id(instance_id)
        if found is None:
            raise InvalidRequest(f"no instance {instance_id!r} in the cluster", param="instance_id")
        return found

    def _decode_instance(self, instance_id: str, what: str) -> InstanceSnapshot:
        found = self._known(instance_id)
        if found.role is not Role.DECODE:
            raise InvalidRequest(
                f"{what} {instance_id!r} is a {found.role.value} worker, not a decode worker"
            )
        if found.state is InstanceState.DEAD:
            raise InvalidRequest(f"{what} {instance_id!r} is DEAD")
        return found
