"""A local pdflow cluster on one machine: a Ray head in this process, the controller, the prefill and
decode workers and one front door, all as Ray actors. ``pdctl up`` and the end-to-end tests use it."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from autoscaler.ray_actors import RayActuator, spawn_worker
from protocol.actuation import Actuator
from protocol.auth import Credentials
from protocol.config import ClusterConfig, PoolsKind
from protocol.snapshots import Role
from runtime.actors import CONTROLLER_NAME, NAMESPACE

__all__ = ["CONTROLLER_NAME", "FRONTDOOR_NAME", "NAMESPACE", "ClusterHandle", "LocalCluster", "free_port"]
FRONTDOOR_NAME = "pdflow-frontdoor-0"

# Process-wide defaults for a laptop cluster: keep every socket on loopback, no telemetry, quiet NIXL, no
# model hub. An explicit setting in the environment wins.
ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DEDUP_LOGS": "0",
    "UCX_NET_DEVICES": "lo",
    "NIXL_LOG_LEVEL": "WARN",
    "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def apply_env_defaults(cache_dir: Path) -> None:
    """Set ``ENV_DEFAULTS`` and, unless ``RAY_AUTH_MODE`` is set already (the Helm chart sets it and Ray's
    token), Ray's authentication: with a cluster secret, Ray's token auth under a token derived from it (so
    that only this cluster's processes join or run code on it); without one, none (a cluster on loopback,
    as in the tests). The Ray actors started here inherit all of it."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir / "vllm"))
    if "RAY_AUTH_MODE" in os.environ:
        return
    ray_token = Credentials.from_env().ray_token()
    if ray_token is None:
        os.environ["RAY_AUTH_MODE"] = "disabled"
    else:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = ray_token


@dataclass
class ClusterHandle:
    config: ClusterConfig
    model_path: Path
    http_url: str = ""
    grpc_address: str = ""
    admin_address: str = ""
    actors: dict[str, Any] = field(default_factory=dict)

    def workers(self, role: Role) -> dict[str, Any]:
        """The workers this process started as ``role``, by actor name (a worker switched to the other role
        since keeps its name: ask the controller for the pools as they are)."""
        return {name: a for name, a in self.actors.items() if name.startswith(f"pdflow-{role.value}-")}


class LocalCluster:
    def __init__(
        self,
        config: ClusterConfig,
        model_path: Path,
        *,
        log_to_driver: bool = False,
        ray_address: str | None = None,
    ) -> None:
        """``ray_address``: join that Ray cluster (``auto``: the one started on this node, as in the Helm
        chart's head pod) instead of starting one in this process. With ``kubernetes.pools: kubernetes`` the
        workers are pods that join by themselves (``pdctl pod worker``): none is started here."""
        self.config = config
        self.model_path = model_path
        self._log_to_driver = log_to_driver
        self._ray_address = ray_address
        self._pods = config.kubernetes.pools is PoolsKind.KUBERNETES
        self.handle = ClusterHandle(config, model_path)

    def start(self, say: Callable[[str], None] = lambda _: None) -> ClusterHandle:
        """Start Ray, the controller, the workers (in parallel) and the front door. Raises on any failure,
        after stopping whatever had started."""
        from pdctl.model_cache import default_cache_dir

        # Before Ray is imported: it reads some of these once, at import.
        apply_env_defaults(default_cache_dir().parents[1])
        import ray

        try:
            say("starting Ray")
            if not ray.is_initialized() and self._ray_address is not None:
                ray.init(
                    address=self._ray_address,
                    namespace=NAMESPACE,
                    log_to_driver=self._log_to_driver,
                )
            elif not ray.is_initialized():
                ray.init(
                    namespace=NAMESPACE,
                    include_dashboard=False,
                    log_to_driver=self._log_to_driver,
                    object_store_memory=256 * 1024**2,
                    num_cpus=os.cpu_count() or 2,
                    _node_ip_address="127.0.0.1",
                )
            self._start_controller()
            self._start_workers(say)
            self._start_frontdoor()
        except BaseException:
            self.stop()
            raise
        return self.handle

    def _start_controller(self) -> None:
        import ray

        from controller.actor import Controller

        cfg = self.config.model_copy(deep=True)
        if cfg.controller.admin_port == 0:
            cfg.controller.admin_port = free_port()
        actor = (
            ray.remote(cast(Any, Controller))
            .options(name=CONTROLLER_NAME, num_cpus=0, max_concurrency=1000, **self._on_this_node())
            .remote(cfg.model_dump(mode="json"), NAMESPACE)
        )
        # the controller sizes the pools through this actuator: the autoscaler's policy when
        # autoscaler.enabled, and `pdctl scale` / `pdctl set-role` either way
        actuator: Actuator
        if self._pods:
            from autoscaler.kubernetes import KubernetesActuator

            actuator = KubernetesActuator.from_config(cfg)
        else:
            actuator = RayActuator(cfg.model_dump(mode="json"), str(self.model_path), NAMESPACE)
        port: int = ray.get(actor.start.remote(actuator), timeout=60)
        self.handle.actors[CONTROLLER_NAME] = actor
        self.handle.admin_address = f"{cfg.controller.admin_host}:{port}"

    def _on_this_node(self) -> dict[str, Any]:
        """Joined to a Ray cluster, the controller and the front door run on this node (the head pod, where
        the Services send their traffic), not wherever Ray finds room."""
        if self._ray_address is None:
            return {}
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}

    def add_worker(self, role: Role, index: int) -> tuple[str, Any]:
        """Create one worker actor (not yet started)."""
        name, actor = spawn_worker(self.config, str(self.model_path), role, index)
        self.handle.actors[name] = actor
        return name, actor

    def _start_workers(self, say: Callable[[str], None]) -> None:
        import ray

        if self._pods:
            return
        started = []
        for role, pool in ((Role.PREFILL, self.config.prefill), (Role.DECODE, self.config.decode)):
            for index in range(pool.replicas):
                name, actor = self.add_worker(role, index)
                started.append((name, actor.start.remote()))
        if not started:
            return
        say(f"starting {len(started)} vLLM engine(s): " + ", ".join(n for n, _ in started))
        t0 = time.monotonic()
        ray.get([ref for _, ref in started], timeout=self.config.worker.start_timeout_s)
        say(f"engines ready in {time.monotonic() - t0:.0f}s")

    def _start_frontdoor(self) -> None:
        import ray

        from frontdoor.actor import FrontDoor

        actor = (
            ray.remote(cast(Any, FrontDoor))
            .options(name=FRONTDOOR_NAME, num_cpus=0, max_concurrency=1000, **self._on_this_node())
            .remote(
                self.config.model_dump(mode="json"),
                str(self.model_path),
                NAMESPACE,
                CONTROLLER_NAME,
                FRONTDOOR_NAME,
            )
        )
        addresses: dict[str, str] = ray.get(actor.start.remote(), timeout=120)
        self.handle.actors[FRONTDOOR_NAME] = actor
        self.handle.http_url = addresses["http"]
        self.handle.grpc_address = addresses["grpc"]

    def wait_until_serving(self, timeout_s: float = 30.0) -> None:
        """Block until the front door's snapshot shows every configured worker alive."""
        import ray

        fd = self.handle.actors[FRONTDOOR_NAME]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            health = ray.get(fd.health.remote(), timeout=10)
            if (
                health["prefill_workers"] >= self.config.prefill.replicas
                and health["decode_workers"] >= self.config.decode.replicas
            ):
                return
            time.sleep(0.1)
        raise TimeoutError(f"cluster not serving after {timeout_s:.0f}s: {health}")

    def _workers_started_by_the_autoscaler(self) -> list[Any]:
        """Worker actors this process did not create (the controller's actuator did)."""
        import ray

        found = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = entry["name"]
            if entry["namespace"] != NAMESPACE or name in self.handle.actors:
                continue
            if name.startswith(("pdflow-prefill-", "pdflow-decode-")):
                with contextlib.suppress(ValueError):
                    found.append(ray.get_actor(name, namespace=NAMESPACE))
        return found

    def stop(self) -> None:
        """Stop the front door (no new requests), then the workers (their engines' subprocesses exit), then
        the controller, then Ray. Idempotent."""
        import ray

        if not ray.is_initialized():
            return
        actors = self.handle.actors
        workers = [a for n, a in actors.items() if n not in (FRONTDOOR_NAME, CONTROLLER_NAME)]
        workers += self._workers_started_by_the_autoscaler()
        tiers = [
            [a for n, a in actors.items() if n == FRONTDOOR_NAME],
            workers,
            [a for n, a in actors.items() if n == CONTROLLER_NAME],
        ]
        for tier in tiers:
            refs = [a.shutdown.remote() for a in tier]
            if refs:  # a dead actor cannot shut down; it is killed below either way
                ray.wait(refs, num_returns=len(refs), timeout=30)
            for actor in tier:
                with contextlib.suppress(ValueError, ray.exceptions.RayError):
                    ray.kill(actor)
        actors.clear()
        ray.shutdown()
