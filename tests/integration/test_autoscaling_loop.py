"""The controller's autoscaler loop end to end below the engine: the pure policy decides, the loop cordons,
drains (live migration, and the requests still on their way to the victim), keeps warm, puts back and
removes, through an actuator that adds and removes in-process workers on fake engines (``FakeCluster``). What
a user would notice: the pools follow the load, and no request fails or loses a token while they do."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import pytest

from engine.fake_model import LatencyModel
from policy.scaling import ScaleReason
from protocol.errors import InvalidRequest
from protocol.instances import InstanceState
from protocol.snapshots import Role
from tests.integration.test_request_path import colocated
from tests.support.fake_cluster import FakeCluster
from tests.support.fake_scaling import autoscaler

pytestmark = pytest.mark.fakes

PROMPT = tuple(range(300, 340))
TOKENS = 40
# prefill long enough that requests are on their way to a victim when it is cordoned; decode long enough
# that some are running there
LATENCY = LatencyModel(prefill=((1, 0.15), (4096, 0.15)), decode=((1, 0.004), (32, 0.006)))
SCALE_IN = {
    "autoscaler.target_decode_tps": 1e6,  # one decode instance carries anything: the policy wants one
    "autoscaler.in_ticks": 1,
    "autoscaler.warm_s": 0,
    "autoscaler.min_prefill": 1,
    "autoscaler.min_decode": 1,
}


class Load:
    """``clients`` clients, each sending one request after another until stopped; every answer is checked
    against what one colocated engine gives."""

    def __init__(self, cluster: FakeCluster, clients: int) -> None:
        self.cluster = cluster
        self.stop = asyncio.Event()
        self.ok = 0
        self.failures: list[str] = []
        self._ids = itertools.count()
        self._expected = colocated(PROMPT, TOKENS)
        self._tasks = [asyncio.create_task(self._client(k)) for k in range(clients)]

    async def _client(self, k: int) -> None:
        while not self.stop.is_set():
            rid = f"c{k}-{next(self._ids)}"
            try:
                tokens, finish = await self.cluster.generate(PROMPT, TOKENS, request_id=rid)
            except Exception as exc:
                self.failures.append(f"{rid}: {type(exc).__name__}: {exc}")
                continue
            if tokens != self._expected or finish != "length":
                self.failures.append(f"{rid}: {len(tokens)} tokens, finish {finish!r}, wrong tokens")
            else:
                self.ok += 1

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 30)

    async def __aenter__(self) -> Load:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.stop.is_set():  # a failed assertion: stop the clients, or the cluster never settles
            self.stop.set()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def _until(what: str, cond: Any, timeout_s: float = 10.0) -> None:
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(poll(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"waited {timeout_s} s for {what}") from None


async def test_a_decode_scale_in_under_load_drains_the_victim_and_loses_no_request() -> None:
    async with FakeCluster(prefill=1, decode=2, latency=LATENCY, overrides=SCALE_IN) as cluster:
        loop, actuator, doors = autoscaler(cluster)
        async with Load(cluster, clients=6) as load:
            # both decode workers have requests running and requests still prefilling for them
            await _until(
                "requests on their way to both decode workers",
                lambda: all(cluster.router.inbound(f"decode-{i}") > 0 for i in (0, 1)),
            )
            record = await loop.tick()
            assert record is not None and record.decision.reason is ScaleReason.SCALE_IN, record
            (victim,) = record.decision.victims
            await loop.settle(30)
            served_before = load.ok
            await _until("requests served after the scale-in", lambda: load.ok >= served_before + 6)
            await load.finish()

        assert load.failures == []
        assert actuator.removed == [victim] and f"pdflow-{victim}" not in cluster.workers
        assert cluster.registry.snapshot(0).by_id(victim) is None
        assert doors.most_inbound[victim] > 0, "the drain had requests on their way to wait for"
        (done,) = [r for r in loop.history if r.decision.victims]
        assert any("drained" in a for a in done.actions) and any("applied" in a for a in done.actions)
        await cluster.wait_idle()


async def test_without_waiting_for_requests_on_their_way_a_scale_in_costs_them_a_recompute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The control case: a drain that sees only what already runs on the victim removes it while requests
    are still prefilling for it. They used to fail; now their KV hand-off is lost and another decode worker
    recomputes them (work the drain that waits does not waste)."""
    caplog.set_level(logging.WARNING, logger="frontdoor.router")
    async with FakeCluster(prefill=1, decode=2, latency=LATENCY, overrides=SCALE_IN) as cluster:
        loop, _, _ = autoscaler(cluster, blind=True)
        async with Load(cluster, clients=6) as load:
            await _until(
                "requests on their way to both decode workers",
                lambda: all(cluster.router.inbound(f"decode-{i}") > 0 for i in (0, 1)),
            )
            record = await loop.tick()
            assert record is not None and record.decision.victims
            await loop.settle(30)
            await load.finish()
        assert load.failures == []
        recovered = [
            r for r in caplog.records if "recomputes its prompt" in r.message or "resumed on" in r.message
        ]
        assert recovered, "removing a victim with requests on their way to it should lose their KV"


async def test_a_prefill_scale_in_waits_for_the_prompts_and_hand_offs_in_flight() -> None:
    overrides = {**SCALE_IN, "autoscaler.shape": "1:1"}
    async with FakeCluster(prefill=2, decode=1, latency=LATENCY, overrides=overrides) as cluster:
        loop, actuator, doors = autoscaler(cluster)
        async with Load(cluster, clients=6) as load:
            await _until(
                "prompts on both prefill workers",
                lambda: all(cluster.router.inbound(f"prefill-{i}") > 0 for i in (0, 1)),
            )
            record = await loop.tick()
            assert record is not None and record.decision.reason is ScaleReason.SCALE_IN, record
            (victim,) = record.decision.victims
            assert victim.startswith("prefill-")
            await loop.settle(30)
            served_before = load.ok
            await _until("requests served after the scale-in", lambda: load.ok >= served_before + 6)
            await load.finish()

        assert load.failures == []
        assert actuator.removed == [victim]
        assert doors.most_inbound[victim] > 0
        await cluster.wait_idle()


async def test_load_over_target_starts_an_instance_that_is_pending_until_it_serves() -> None:
    overrides = {"autoscaler.target_decode_tps": 1.0, "autoscaler.max_decode": 3, "autoscaler.shape": "1:3"}
    async with FakeCluster(prefill=1, decode=2, latency=LATENCY, overrides=overrides) as cluster:
        loop, actuator, _ = autoscaler(cluster)
        async with Load(cluster, clients=4) as load:
            await _until("decode tokens/s reported", lambda: loop.observe(_members(actuator)).decode_tps > 3)
            record = await loop.tick()
            assert record is not None and record.decision.reason is ScaleReason.SCALE_OUT, record
            assert (record.decision.prefill, record.decision.decode) == (1, 3)
            await loop.settle(10)
            (new,) = [i for i in actuator.members(Role.DECODE).instances if i not in ("decode-0", "decode-1")]

            await _until(
                "the new decode worker serving",
                lambda: any(r.decode_instance == new for r in cluster.requests.list("", 0)),
            )
            await load.finish()
        assert load.failures == []
        await loop.tick()  # at the maximum: nothing more to start
        status = loop.status()
        assert (status.ready[Role.DECODE], status.pending[Role.DECODE]) == (3, 0)
        for _ in range(loop.history.maxlen or 0):  # steady ticks fill the history...
            await loop.tick()
        assert all(not r.actions for r in loop.history)
        assert [r.decision.reason for r in loop.acted] == [ScaleReason.SCALE_OUT]  # ...not what was done
        await cluster.wait_idle()


async def test_a_warm_victim_is_put_back_when_latency_regresses() -> None:
    overrides = {**SCALE_IN, "autoscaler.warm_s": 600}
    async with FakeCluster(prefill=1, decode=2, latency=LATENCY, overrides=overrides) as cluster:
        loop, actuator, _ = autoscaler(cluster)
        async with Load(cluster, clients=4) as load:
            await _until("requests on both decode workers", lambda: _busy_decoders(cluster) == 2)
            record = await loop.tick()
            assert record is not None
            (victim,) = record.decision.victims
            await loop.settle(30)
            assert _state(cluster, victim) is InstanceState.CORDONED  # out of dispatch, still there
            assert loop.status().draining[Role.DECODE] == 1 and actuator.removed == []

            loop.config.ttft_slo_s = 0.01  # every request is now over its TTFT SLO
            await _until("a request over the SLO", lambda: loop.observe(_members(actuator)).ttft_p99_s)
            record = await loop.tick()
            assert record is not None and record.decision.restore == (victim,), record
            await loop.settle(10)
            assert _state(cluster, victim) is InstanceState.READY
            served = {r.request_id for r in cluster.requests.list("", 0) if r.decode_instance == victim}
            await _until(
                "requests on the restored worker",
                lambda: any(
                    r.decode_instance == victim and r.request_id not in served
                    for r in cluster.requests.list("", 0)
                ),
            )
            await load.finish()
        assert load.failures == []
        await cluster.wait_idle()


async def test_a_manual_target_pauses_the_policy_until_resumed() -> None:
    async with FakeCluster(prefill=1, decode=2, latency=LATENCY, overrides=SCALE_IN) as cluster:
        loop, actuator, _ = autoscaler(cluster)
        with pytest.raises(InvalidRequest, match=r"decode must be within 1\.\.4"):
            await loop.set_target(1, 9)
        record = await loop.set_target(1, 1)
        assert record.manual and len(actuator.removed) == 1
        assert loop.paused == "manual target 1P+1D" and await loop.tick() is None

        await loop.resume()
        assert loop.paused == "" and loop.manual_target is None
        assert await loop.tick() is not None
        await cluster.wait_idle()


async def test_set_role_drains_an_instance_and_replaces_it_in_the_other_pool() -> None:
    async with FakeCluster(prefill=1, decode=2, latency=LATENCY, overrides=SCALE_IN) as cluster:
        loop, actuator, _ = autoscaler(cluster)
        async with Load(cluster, clients=4) as load:
            await _until("requests on both decode workers", lambda: _busy_decoders(cluster) == 2)
            record = await loop.set_role("decode-1", Role.PREFILL)
            assert record.decision.flips == (("decode-1", Role.PREFILL),)
            assert actuator.removed == ["decode-1"]
            await _until(
                "a second prefill worker", lambda: len(actuator.members(Role.PREFILL).instances) == 2
            )
            await load.finish()
        assert load.failures == []
        with pytest.raises(InvalidRequest, match="prefill instance already"):
            await loop.set_role("prefill-0", Role.PREFILL)
        await cluster.wait_idle()


async def test_set_role_switches_a_worker_in_place_under_load_and_back() -> None:
    async with FakeCluster(
        prefill=1, decode=2, latency=LATENCY, overrides=SCALE_IN, switchable=True
    ) as cluster:
        loop, actuator, _ = autoscaler(cluster)
        async with Load(cluster, clients=4) as load:
            await _until("requests on both decode workers", lambda: _busy_decoders(cluster) == 2)
            with pytest.raises(InvalidRequest, match="drain it before switching"):
                cluster.worker("decode-1").take_role("prefill")
            record = await loop.set_role("decode-1", Role.PREFILL)
            assert "decode -> prefill in place" in record.actions[0], record.actions
            assert actuator.switched == [("decode-1", Role.PREFILL)]
            assert actuator.calls == []  # no instance stopped or started
            assert _view(cluster, "decode-1") == (Role.PREFILL, InstanceState.READY)
            await _until("decode-1 prefilling", lambda: _served(cluster, "decode-1", Role.PREFILL) > 0)
            decoded = _served(cluster, "decode-1", Role.DECODE)

            record = await loop.set_role("decode-1", Role.DECODE)
            assert "prefill -> decode in place" in record.actions[0], record.actions
            assert _view(cluster, "decode-1") == (Role.DECODE, InstanceState.READY)
            await _until(
                "decode-1 decoding again", lambda: _served(cluster, "decode-1", Role.DECODE) > decoded
            )
            await load.finish()
        assert load.failures == [] and load.ok > 0
        assert actuator.calls == [] and len(cluster.workers) == 3
        await cluster.wait_idle()


async def test_a_prefill_heavy_load_switches_a_ready_decode_worker_instead_of_starting_one() -> None:
    overrides = {
        **SCALE_IN,
        "autoscaler.in_ticks": 6,  # the decode pool's surplus goes to the prefill pool, not away
        "autoscaler.target_prefill_tps": 1.0,  # every prompt token is over target: P wants more
        "autoscaler.max_instances": 3,
    }
    async with FakeCluster(
        prefill=1, decode=2, latency=LATENCY, overrides=overrides, switchable=True
    ) as cluster:
        loop, actuator, _ = autoscaler(cluster)
        async with Load(cluster, clients=4) as load:
            await _until(
                "prompt tokens/s reported", lambda: loop.observe(_members(actuator)).prefill_miss_tps > 2
            )
            record = await loop.tick()
            assert record is not None and record.decision.reason is ScaleReason.PREFILL_PRESSURE, record
            ((flipped, to),) = record.decision.flips
            assert to is Role.PREFILL and flipped.startswith("decode-")
            assert (record.decision.prefill, record.decision.decode) == (2, 1)
            await loop.settle(10)
            assert actuator.switched == [(flipped, Role.PREFILL)]
            assert actuator.calls == [] and len(cluster.workers) == 3  # switched: nothing started
            assert _view(cluster, flipped) == (Role.PREFILL, InstanceState.READY)
            await load.finish()
        assert load.failures == []
        status = loop.status()
        assert (status.ready[Role.PREFILL], status.ready[Role.DECODE]) == (2, 1)
        await cluster.wait_idle()


async def test_a_switch_that_fails_leaves_the_worker_serving_in_its_old_role() -> None:
    async with FakeCluster(
        prefill=1, decode=2, latency=LATENCY, overrides=SCALE_IN, switchable=True
    ) as cluster:
        loop, actuator, _ = autoscaler(cluster)
        actuator.refuse_switch = True
        async with Load(cluster, clients=4) as load:
            await _until("requests on both decode workers", lambda: _busy_decoders(cluster) == 2)
            record = await loop.set_role("decode-1", Role.PREFILL)
            assert "not switched" in record.actions[0] and "back in service" in record.actions[0], record
            assert _view(cluster, "decode-1") == (Role.DECODE, InstanceState.READY)
            decoded = _served(cluster, "decode-1", Role.DECODE)
            await _until(
                "decode-1 decoding again", lambda: _served(cluster, "decode-1", Role.DECODE) > decoded
            )
            await load.finish()
        assert load.failures == [] and actuator.switched == []
        assert loop.actions.leaving == {}
        await cluster.wait_idle()


async def test_a_warm_instance_switches_without_a_second_drain() -> None:
    overrides = {**SCALE_IN, "autoscaler.warm_s": 600}
    async with FakeCluster(
        prefill=1, decode=2, latency=LATENCY, overrides=overrides, switchable=True
    ) as cluster:
        loop, actuator, _ = autoscaler(cluster)
        async with Load(cluster, clients=4) as load:
            await _until("requests on both decode workers", lambda: _busy_decoders(cluster) == 2)
            record = await loop.tick()
            assert record is not None
            (victim,) = record.decision.victims
            await loop.settle(30)
            assert loop.actions.leaving[victim].state is InstanceState.WARM
            record = await loop.set_role(victim, Role.PREFILL)
            assert f"{victim}: drained already; decode -> prefill in place" in record.actions[0], record
            assert _view(cluster, victim) == (Role.PREFILL, InstanceState.READY)
            await _until(f"{victim} prefilling", lambda: _served(cluster, victim, Role.PREFILL) > 0)
            await load.finish()
        assert load.failures == [] and actuator.removed == [] and loop.actions.leaving == {}
        await cluster.wait_idle()


async def test_nothing_is_decided_until_the_cluster_s_first_instances_serve() -> None:
    """An engine still starting is not demand falling: the policy waits for it (or its start deadline)."""
    overrides = {**SCALE_IN, "worker.start_timeout_s": 30}
    async with FakeCluster(prefill=1, decode=2, latency=LATENCY, overrides=overrides) as cluster:
        loop, actuator, _ = autoscaler(cluster)
        actuator.ghosts = {"decode-9"}  # as `pdctl up` has started it, still loading its engine
        assert await loop.tick() is None
        assert loop.status().paused == "starting: waiting for decode-9 to serve"
        assert actuator.calls == [] and actuator.removed == []

        actuator.ghosts = set()  # it served (and went): the policy acts, here scaling in the idle pool
        record = await loop.tick()
        assert record is not None and record.decision.reason is ScaleReason.SCALE_IN, record
        assert loop.status().paused == ""
        await loop.settle(30)

    overrides = {**SCALE_IN, "worker.start_timeout_s": 0.05}
    async with FakeCluster(prefill=1, decode=2, latency=LATENCY, overrides=overrides) as cluster:
        loop, actuator, _ = autoscaler(cluster)
        actuator.ghosts = {"decode-9"}
        assert await loop.tick() is None
        await _until("the start deadline", lambda: cluster.clock() - (loop._first_tick or 0) > 0.05)
        record = await loop.tick()  # past its deadline, a hung start no longer holds the pools
        assert record is not None and "decode-9" in record.decision.cancel, record


def _view(cluster: FakeCluster, iid: str) -> tuple[Role, InstanceState] | None:
    inst = cluster.registry.snapshot(0).by_id(iid)
    return (inst.role, inst.state) if inst is not None else None


def _served(cluster: FakeCluster, iid: str, role: Role) -> int:
    """Requests in the log that ``iid`` prefilled (or decoded)."""
    field = "prefill_instance" if role is Role.PREFILL else "decode_instance"
    return sum(1 for r in cluster.requests.list("", 0) if getattr(r, field) == iid)


def _state(cluster: FakeCluster, iid: str) -> InstanceState | None:
    inst = cluster.registry.snapshot(0).by_id(iid)
    return inst.state if inst is not None else None


def _members(actuator: Any) -> dict[Role, Any]:
    return {role: actuator.members(role) for role in (Role.PREFILL, Role.DECODE)}


def _busy_decoders(cluster: FakeCluster) -> int:
    return sum(1 for w in cluster.workers.values() if hasattr(w, "running_requests") and w.running_requests())


async def test_a_dead_instance_is_removed_and_replaced() -> None:
    overrides = {"autoscaler.target_decode_tps": 1e6, "autoscaler.min_decode": 2, "autoscaler.in_ticks": 1}
    async with FakeCluster(prefill=1, decode=2, latency=LATENCY, overrides=overrides) as cluster:
        loop, actuator, _ = autoscaler(cluster)
        cluster.engines["pdflow-decode-1"].kill()  # its engine core dies: the worker reports DEAD
        await _until("decode-1 reported DEAD", lambda: _state(cluster, "decode-1") is InstanceState.DEAD)
        record = await loop.tick()
        assert actuator.removed == ["decode-1"] and loop.counts["removed_dead"] == 1
        assert record is not None and record.decision.reason is ScaleReason.SCALE_OUT, record
        await loop.settle(10)
        replacement = [i for i in actuator.members(Role.DECODE).instances if i != "decode-0"]
        assert len(replacement) == 1 and replacement[0] != "decode-1"


async def test_with_the_autoscaler_off_a_dead_instance_is_replaced_and_the_pool_keeps_its_size() -> None:
    overrides = {"decode.replicas": 2}  # the size it was started with
    async with FakeCluster(prefill=1, decode=2, latency=LATENCY, overrides=overrides) as cluster:
        loop, actuator, _ = autoscaler(cluster, enabled=False)
        dead: list[str] = []
        for victim in ("decode-1", None):  # and then its replacement: the same pool, the same one left
            victim = victim or next(i for i in actuator.members(Role.DECODE).instances if i != "decode-0")
            cluster.engines[f"pdflow-{victim}"].kill()
            await _until(f"{victim} reported DEAD", lambda v=victim: _state(cluster, v) is InstanceState.DEAD)
            assert await loop.tick() is None  # no decision: the policy is off
            dead.append(victim)
            assert actuator.removed == dead
            await loop.settle(10)
            decode = actuator.members(Role.DECODE).instances
            assert len(decode) == 2 and victim not in decode, decode


async def test_a_dead_instance_no_pool_has_any_more_is_forgotten() -> None:
    """A pod deleted by a rolling update (its worker shut down, its pod gone from the workload) leaves
    ``pdctl status`` and the metrics once it has been silent for three heartbeat timeouts."""
    overrides = {"controller.heartbeat_timeout_s": 0.3, "worker.report_interval_s": 0.05}
    async with FakeCluster(prefill=1, decode=2, latency=LATENCY, overrides=overrides) as cluster:
        loop, actuator, _ = autoscaler(cluster, enabled=False)
        await cluster.workers["pdflow-decode-1"].shutdown()  # SIGTERM: it reports DEAD, then nothing
        actuator.departed.add("decode-1")
        await loop.tick()
        assert _state(cluster, "decode-1") is InstanceState.DEAD  # not silent long enough yet
        await _until(
            "decode-1 silent for 3 heartbeat timeouts",
            lambda: cluster.registry.seconds_since_report("decode-1", cluster.clock()) > 0.9,
        )
        await loop.tick()
        assert cluster.registry.snapshot(0.0).by_id("decode-1") is None
        assert _state(cluster, "decode-0") is InstanceState.READY  # the one still in its pool stays


async def test_a_drain_that_cannot_finish_puts_the_victim_back_instead_of_removing_it() -> None:
    overrides = {**SCALE_IN, "migration.timeout_s": 0.5}  # a drain gives up after 4 x 0.5 s
    async with FakeCluster(prefill=1, decode=2, latency=LATENCY, overrides=overrides) as cluster:
        loop, actuator, doors = autoscaler(cluster)
        doors.stuck = True  # a front door that always has a request on its way to the victim
        record = await loop.tick()
        assert record is not None and record.decision.victims
        (victim,) = record.decision.victims
        await loop.settle(30)
        assert actuator.removed == [] and _state(cluster, victim) is InstanceState.READY
        assert any("back in service" in a for a in loop.history[-1].actions), loop.history[-1].actions


async def test_a_pool_that_removes_only_its_highest_ordinal_gets_that_victim() -> None:
    async with FakeCluster(prefill=1, decode=3, latency=LATENCY, overrides=SCALE_IN) as cluster:
        loop, actuator, _ = autoscaler(cluster)
        actuator.highest_only = True
        cluster.config.autoscaler.min_decode = 2
        cluster.config.autoscaler.shape = "1:3"  # one prefill instance for up to three decode ones
        record = await loop.tick()
        assert record is not None and record.decision.reason is ScaleReason.SCALE_IN
        await loop.settle(30)
        assert actuator.removed == ["decode-2"], (record.decision.victims, loop.history[-1].actions)


async def test_a_disabled_autoscaler_takes_manual_targets_and_stays_paused() -> None:
    async with FakeCluster(prefill=1, decode=2, latency=LATENCY, overrides=SCALE_IN) as cluster:
        loop, actuator, _ = autoscaler(cluster, enabled=False)
        assert loop.paused.startswith("autoscaler.enabled is false") and await loop.tick() is None
        await loop.set_target(1, 1)
        assert len(actuator.removed) == 1
        await loop.resume()
        assert loop.paused.startswith("autoscaler.enabled is false") and loop.manual_target is None


async def test_no_decision_is_made_while_an_operator_s_action_is_carried_out() -> None:
    async with FakeCluster(prefill=1, decode=2, latency=LATENCY, overrides=SCALE_IN) as cluster:
        loop, _, _ = autoscaler(cluster)
        switching = asyncio.create_task(loop.set_role("decode-1", Role.PREFILL))
        await _until("the switch under way", lambda: loop._lock.locked())
        assert await loop.tick() is None
        await asyncio.wait_for(switching, 30)
        assert await loop.tick() is not None


async def test_a_warm_victim_that_dies_is_still_removed() -> None:
    overrides = {**SCALE_IN, "autoscaler.warm_s": 0.2}
    async with FakeCluster(prefill=1, decode=2, latency=LATENCY, overrides=overrides) as cluster:
        loop, actuator, _ = autoscaler(cluster)
        record = await loop.tick()
        assert record is not None
        (victim,) = record.decision.victims
        await loop.settle(30)
        assert actuator.removed == []  # warm
        cluster.engines[f"pdflow-{victim}"].kill()
        await _until("the victim reported DEAD", lambda: _state(cluster, victim) is InstanceState.DEAD)
        await loop.tick()  # out of sight of the policy (DEAD), but the loop removes it
        assert actuator.removed == [victim] and loop.counts["removed_dead"] == 1
        assert victim not in loop.actions.leaving
