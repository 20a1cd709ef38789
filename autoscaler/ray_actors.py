"""The Ray actuator: a pool is the worker actors named ``pdflow-<role>-<n>`` in the cluster's namespace, on
the local Ray cluster or any other (KubeRay included). Scaling out creates actors and starts their engines;
scaling in shuts exactly the named instances down (their engines' subprocesses exit) and kills the actors; a
role switch moves a drained worker to the other pool in place (``autoscaler.switchable``), so an actor's name
says the role it started in and its pool is the role it reports. ``create_worker`` is the one place worker
actors are created (by ``spawn_worker`` for the pools here and ``pdctl up``; by a Kubernetes pod for its
own worker).

The actuator is handed to the controller actor by whoever starts the cluster; it pickles by value (settings
only) and looks everything else up in Ray when called."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from protocol.actuation import Actuation, Outcome, PoolMembers
from protocol.config import ClusterConfig
from protocol.snapshots import Role
from runtime.actors import CONTROLLER_NAME, NAMESPACE

log = logging.getLogger(__name__)
_NAME = re.compile(r"^pdflow-(prefill|decode)-(\d+)$")
_SHUTDOWN_S = 30.0
_ASK_S = 2.0  # a worker's answer to a quick question (its role)
_SWITCH_S = 10.0  # a drained worker taking the other role


def worker_name(role: Role, index: int) -> str:
    return f"pdflow-{role.value}-{index}"


def spawn_worker(
    config: ClusterConfig,
    model_path: str,
    role: Role,
    index: int,
    *,
    namespace: str = NAMESPACE,
    controller_name: str = CONTROLLER_NAME,
    detached: bool = False,
) -> tuple[str, Any]:
    """Create worker actor ``pdflow-<role>-<index>`` (instance ``<role>-<index>``); its engine starts when
    ``start`` is called on it. ``detached``: it outlives the process that creates it (Ray otherwise ends an
    actor with its owner), as the controller's workers must outlive a controller that dies."""
    name = worker_name(role, index)
    base = config.worker.nixl_base_port
    side_channel = base + index * 2 + (role is Role.DECODE) if base else None
    actor = create_worker(
        config,
        model_path,
        role,
        f"{role.value}-{index}",
        name,
        side_channel_port=side_channel,
        namespace=namespace,
        controller_name=controller_name,
        detached=detached,
    )
    return name, actor


def create_worker(
    config: ClusterConfig,
    model_path: str,
    role: Role,
    instance_id: str,
    actor_name: str,
    *,
    side_channel_port: int | None = None,
    node_id: str | None = None,
    namespace: str = NAMESPACE,
    controller_name: str = CONTROLLER_NAME,
    detached: bool = False,
) -> Any:
    """Create one worker actor (``spawn_worker``'s, or a Kubernetes pod's own, pinned to ``node_id``: the
    pod's Ray node); its engine starts when ``start`` is called on it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from autoscaler.switchable import SwitchableWorker

    if side_channel_port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            side_channel_port = s.getsockname()[1]
    env = {
        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side_channel_port),
        "VLLM_CPU_KVCACHE_SPACE": str(config.engine.kv_cache_gib),
        "OMP_NUM_THREADS": str(config.engine.cpu_threads),
    }
    options: dict[str, Any] = {
        "name": actor_name,
        "namespace": namespace,
        "num_cpus": 0,
        "max_concurrency": 1000,
        "runtime_env": {"env_vars": env},
    }
    if node_id is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
    if detached:
        options["lifetime"] = "detached"
    return (
        ray.remote(SwitchableWorker)
        .options(**options)
        .remote(
            instance_id,
            actor_name,
            model_path,
            config.model_dump(mode="json"),
            controller_name,
            namespace,
            role=role.value,
        )
    )


@dataclass
class RayActuator:
    """Sizes the pools as Ray actors. Instance ids are ``<role>-<n>`` and actor names ``pdflow-<role>-<n>``,
    after the role each started in."""

    config: dict[str, Any]  # the ClusterConfig, as JSON
    model_path: str
    namespace: str = NAMESPACE
    kind = "ray"
    switches_in_place = True
    _starting: dict[str, Any] = field(default_factory=dict, init=False, repr=False)  # instance -> start ref
    # the handles of the actors this actuator created (detached: they outlive a controller that dies)
    _handles: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    # ids are never reused (front doors, NIXL agents and actor lookups cache by name): the highest index seen
    _highest: int = field(default=-1, init=False, repr=False)
    _applied: dict[tuple[str, Role], Actuation] = field(default_factory=dict, init=False, repr=False)
    _roles: dict[str, Role] = field(default_factory=dict, init=False, repr=False)  # instance -> its role now

    def __getstate__(self) -> dict[str, Any]:
        """Settings only: handles and refs belong to the process that made them."""
        return {"config": self.config, "model_path": self.model_path, "namespace": self.namespace}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def members(self, role: Role) -> PoolMembers:
        instances = self._instances(role)
        pending = tuple(i for i in instances if self._still_starting(i))
        return PoolMembers(len(instances), instances, pending)

    def victim_order(self, role: Role, candidates: list[str]) -> list[str]:
        return list(candidates)  # any actor can go

    def resume(self, role: Role) -> PoolMembers:
        return self.members(role)  # nobody else sizes a Ray pool

    def scale(
        self,
        decision_id: str,
        role: Role,
        replicas: int,
        *,
        victims: tuple[str, ...] = (),
        cancel: tuple[str, ...] = (),
    ) -> Actuation:
        done = self._applied.get((decision_id, role))
        if done is not None:
            return Actuation(decision_id, role, Outcome.UNCHANGED, done.replicas_after, done.replicas_after)
        instances = self._instances(role)
        before = len(instances)
        if replicas == before:
            return Actuation(decision_id, role, Outcome.UNCHANGED, before, before)
        if replicas > before:
            result = self._start(decision_id, role, instances, replicas - before)
        else:
            result = self._stop(decision_id, role, instances, replicas, victims, cancel)
        if result.outcome is Outcome.APPLIED:
            self._applied[(decision_id, role)] = result
        return result

    def switch(self, decision_id: str, instance_id: str, role: Role) -> Actuation:
        """The drained worker ``instance_id`` serves as ``role`` from now on (``SwitchableWorker``): one call
        to it, within ``_SWITCH_S``."""
        import ray

        done = self._applied.get((decision_id, role))
        if done is not None:
            return Actuation(decision_id, role, Outcome.UNCHANGED, done.replicas_after, done.replicas_after)
        before = 0
        try:
            before = len(self._instances(role))
            actor = self._actor(instance_id)
            ray.get(actor.switch_role.remote(role.value), timeout=_SWITCH_S)
        except Exception as exc:  # gone, busy, or not answering: it stays where it is
            self._roles.pop(instance_id, None)  # a call that timed out may still land: ask it next time
            detail = f"{instance_id} not switched: {type(exc).__name__}: {exc}"
            return Actuation(decision_id, role, Outcome.FAILED, before, before, detail=detail)
        self._roles[instance_id] = role
        result = Actuation(
            decision_id, role, Outcome.APPLIED, before, before + 1, detail=f"{instance_id} switched in place"
        )
        self._applied[(decision_id, role)] = result
        return result

    # ---- helpers ----

    def _instances(self, role: Role) -> tuple[str, ...]:
        import ray

        names = ray.util.list_named_actors(all_namespaces=True)
        found = []
        for entry in names:
            m = _NAME.match(entry["name"])
            if m is None or entry["namespace"] != self.namespace:
                continue
            iid = f"{m[1]}-{m[2]}"
            # every index seen stays taken, workers this actuator did not start included (`pdctl up`'s, an
            # operator's): the loop lists the pools each tick, so a worker that served is seen before it dies
            self._highest = max(self._highest, int(m[2]))
            if self._role_of(iid, Role(m[1])) is role:
                found.append((int(m[2]), iid))
        return tuple(iid for _, iid in sorted(found))

    def _role_of(self, instance_id: str, named: Role) -> Role:
        """The role ``instance_id`` serves: as this actuator last set it, else as the worker says (once; a
        worker this actuator did not start, or one switched before a controller restart), else its name's."""
        import ray

        role = self._roles.get(instance_id)
        if role is None:
            try:
                role = Role(ray.get(self._actor(instance_id).current_role.remote(), timeout=_ASK_S))
            except Exception:  # not scheduled yet, or busy: ask again next time
                return named
            self._roles[instance_id] = role
        return role

    def _actor(self, instance_id: str) -> Any:
        import ray

        actor = self._handles.get(instance_id)
        if actor is None:
            role, index = instance_id.rsplit("-", 1)
            actor = ray.get_actor(worker_name(Role(role), int(index)), namespace=self.namespace)
        return actor

    def _still_starting(self, instance_id: str) -> bool:
        import ray

        ref = self._starting.get(instance_id)
        if ref is None:
            return False
        if not ray.wait([ref], timeout=0)[0]:
            return True
        self._starting.pop(instance_id, None)
        try:
            ray.get(ref, timeout=1)
        except Exception as exc:  # its engine did not start: the instance is of no use
            log.error("instance %s failed to start (%s); removing it", instance_id, exc)
            self._kill(instance_id)
        return False

    def _start(self, decision_id: str, role: Role, instances: tuple[str, ...], count: int) -> Actuation:
        config = ClusterConfig.model_validate(self.config)
        used = {
            int(i.rsplit("-", 1)[1]) for i in self._instances(Role.PREFILL) + self._instances(Role.DECODE)
        }
        started: list[str] = []
        index = max(used | {self._highest}) + 1
        while len(started) < count:
            if index not in used:
                self._highest = index
                _, actor = spawn_worker(
                    config,
                    self.model_path,
                    role,
                    index,
                    namespace=self.namespace,
                    detached=True,  # a controller that dies and restarts finds its workers still serving
                )
                instance_id = f"{role.value}-{index}"
                self._handles[instance_id] = actor
                self._roles[instance_id] = role
                self._starting[instance_id] = actor.start.remote()
                started.append(instance_id)
            index += 1
        log.info("decision %s: starting %s", decision_id, ", ".join(started))
        return Actuation(
            decision_id,
            role,
            Outcome.APPLIED,
            len(instances),
            len(instances) + count,
            detail=f"starting {', '.join(started)}",
        )

    def _stop(
        self,
        decision_id: str,
        role: Role,
        instances: tuple[str, ...],
        replicas: int,
        victims: tuple[str, ...],
        cancel: tuple[str, ...],
    ) -> Actuation:
        before = len(instances)
        leaving = tuple(cancel) or tuple(victims)
        if len(leaving) != before - replicas or not set(leaving) <= set(instances):
            detail = (
                f"{before} -> {replicas} needs {before - replicas} of {list(instances)}, got {list(leaving)}"
            )
            return Actuation(decision_id, role, Outcome.REFUSED, before, before, detail=detail)
        if not cancel:
            starting = [i for i in instances if self._still_starting(i)]
            if starting:
                detail = f"{starting} are still starting: no scale-in until they serve"
                return Actuation(decision_id, role, Outcome.PENDING, before, before, detail=detail)
        for instance_id in leaving:
            self._kill(instance_id)
        return Actuation(decision_id, role, Outcome.APPLIED, before, replicas, tuple(leaving))

    def _kill(self, instance_id: str) -> None:
        """Shut the worker down (it tells the controller, then stops its engine), then end its actor."""
        import ray

        self._starting.pop(instance_id, None)
        self._roles.pop(instance_id, None)
        try:
            actor = self._actor(instance_id)
        except ValueError:
            return  # gone already
        self._handles.pop(instance_id, None)
        deadline = time.monotonic() + _SHUTDOWN_S
        with contextlib.suppress(Exception):  # a dead or hung worker is killed below either way
            ray.get(actor.shutdown.remote(), timeout=max(1.0, deadline - time.monotonic()))
        with contextlib.suppress(Exception):
            ray.kill(actor)
