"""A local pdflow cluster on one machine: a Ray head in this process, the controller, the prefill and
decode workers and one front door, all as Ray actors. ``pdctl up`` and the end-to-end tests use it."""

from __future__ import annotations

import contextlib
import functools
import logging
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

__all__ = [
    "CONTROLLER_NAME",
    "FRONTDOOR_NAME",
    "NAMESPACE",
    "REFERENCE_NAME",
    "ClusterHandle",
    "LocalCluster",
    "free_port",
    "frontdoor_name",
]
log = logging.getLogger(__name__)
# a control-plane actor that answers no ping (5 s each) this many times in a row is restarted
_SILENT_PINGS = 2
REFERENCE_NAME = "pdflow-reference"


def frontdoor_name(index: int) -> str:
    return f"pdflow-frontdoor-{index}"


FRONTDOOR_NAME = frontdoor_name(0)

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
    frontdoors: dict[str, dict[str, str]] = field(default_factory=dict)  # by actor name: their addresses

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
        self._silent: dict[str, int] = {}  # control-plane actor -> pings in a row it did not answer
        self._frontdoor_ports: dict[int, tuple[int, int]] = {}  # (HTTP, gRPC) of each front door started

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
            self._start_frontdoors()
        except BaseException:
            self.stop()
            raise
        return self.handle

    def _start_controller(self) -> None:
        import ray

        from controller.actor import Controller

        cfg = self.config.model_copy(deep=True)
        if cfg.controller.admin_port == 0:
            # chosen once: a restarted controller serves the same address
            self.config.controller.admin_port = cfg.controller.admin_port = free_port()
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

    def add_reference(self) -> Any:
        """Start a colocated engine that reports to no controller, so it never takes routed traffic: the
        reference for greedy outputs in tests and benchmarks (``REFERENCE_NAME``). Blocks until it serves."""
        import ray

        from decode_worker.actor import DecodeWorker

        env = {
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "OMP_NUM_THREADS": "1",
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
        }
        actor = (
            ray.remote(cast(Any, DecodeWorker))
            .options(name=REFERENCE_NAME, num_cpus=0, max_concurrency=100, runtime_env={"env_vars": env})
            .remote(
                "reference-0",
                REFERENCE_NAME,
                str(self.model_path),
                self.config.model_dump(mode="json"),
                "",
                NAMESPACE,
            )
        )
        self.handle.actors[REFERENCE_NAME] = actor
        ray.get(actor.start.remote(), timeout=self.config.worker.start_timeout_s)
        return actor

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

    def _start_frontdoors(self) -> None:
        for index in range(self.config.frontdoor.replicas):
            self._start_frontdoor(index)

    def _start_frontdoor(self, index: int) -> None:
        """Front door ``index`` (``frontdoor_name``): on the configured ports plus ``index`` (0: free ports),
        kept for its restarts. The handle's addresses are front door 0's."""
        import ray

        from frontdoor.actor import FrontDoor

        name = frontdoor_name(index)
        cfg = self.config.model_copy(deep=True)
        fd = self.config.frontdoor
        cfg.frontdoor.http_port, cfg.frontdoor.grpc_port = self._frontdoor_ports.get(
            index, (fd.http_port + index if fd.http_port else 0, fd.grpc_port + index if fd.grpc_port else 0)
        )
        actor = (
            ray.remote(cast(Any, FrontDoor))
            .options(name=name, num_cpus=0, max_concurrency=1000, **self._on_this_node())
            .remote(cfg.model_dump(mode="json"), str(self.model_path), NAMESPACE, CONTROLLER_NAME, name)
        )
        addresses: dict[str, str] = ray.get(actor.start.remote(), timeout=120)
        self.handle.actors[name] = actor
        self.handle.frontdoors[name] = addresses
        if index == 0:
            self.handle.http_url = addresses["http"]
            self.handle.grpc_address = addresses["grpc"]
        self._frontdoor_ports[index] = (_port(addresses["http"]), _port(addresses["grpc"]))

    def add_frontdoor(self) -> dict[str, str]:
        """Start one more front door (``frontdoor.replicas`` grows by one); return its addresses."""
        index = self.config.frontdoor.replicas
        self.config.frontdoor.replicas += 1
        self._start_frontdoor(index)
        return self.handle.frontdoors[frontdoor_name(index)]

    def supervise(self) -> list[str]:
        """Restart the controller or a front door if its actor is gone (killed, its process crashed) or has
        answered no ping (5 s each) twice in a row, under the same name and on the same ports: the workers
        report to the new controller by themselves, and the front doors subscribe again. Returns what it
        restarted; call it every second or so (``pdctl up`` does). The workers are the controller's to
        replace, not this."""
        import ray

        restarted = []
        control_plane: list[tuple[str, Callable[[], None]]] = [(CONTROLLER_NAME, self._start_controller)]
        for index in range(self.config.frontdoor.replicas):
            control_plane.append((frontdoor_name(index), functools.partial(self._start_frontdoor, index)))
        for name, start in control_plane:
            actor = self.handle.actors.get(name)
            state = _liveness(actor) if actor is not None else "dead"
            self._silent[name] = self._silent.get(name, 0) + 1 if state == "silent" else 0
            if state == "alive" or 0 < self._silent[name] < _SILENT_PINGS:  # busy, maybe: ask again
                continue
            self._silent[name] = 0
            with contextlib.suppress(ValueError, ray.exceptions.RayError):
                if actor is not None:
                    ray.kill(actor)  # a hung one: it answered no ping
            try:
                _when_the_name_is_free(start)
            except Exception as exc:  # its port not free yet, the controller not back: the next call retries
                log.error("restarting %s failed (%s); trying again", name, exc)
                with contextlib.suppress(ValueError, ray.exceptions.RayError):  # half started: free the name
                    ray.kill(ray.get_actor(name, namespace=NAMESPACE))
                continue
            restarted.append(name)
        return restarted

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
        """Stop the front doors (no new requests), then the controller (it starts no replacement for the
        workers stopping next), then the workers (their engines' subprocesses exit), then Ray. Idempotent."""
        import ray

        if not ray.is_initialized():
            return
        actors = self.handle.actors
        self._stop_tier([a for n, a in actors.items() if n in self.handle.frontdoors])
        self._stop_tier([a for n, a in actors.items() if n == CONTROLLER_NAME])
        workers = [a for n, a in actors.items() if n not in self.handle.frontdoors and n != CONTROLLER_NAME]
        self._stop_tier(workers + self._workers_started_by_the_autoscaler())
        actors.clear()
        ray.shutdown()

    @staticmethod
    def _stop_tier(tier: list[Any]) -> None:
        import ray

        refs = [a.shutdown.remote() for a in tier]
        if refs:  # a dead actor cannot shut down; it is killed below either way
            ray.wait(refs, num_returns=len(refs), timeout=30)
        for actor in tier:
            with contextlib.suppress(ValueError, ray.exceptions.RayError):
                ray.kill(actor)


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _liveness(actor: Any, deadline_s: float = 5.0) -> str:
    """``alive``, ``dead`` (Ray says the actor is gone) or ``silent`` (no answer to a ping within
    ``deadline_s``: hung, stopped, or only too busy)."""
    import ray

    try:
        ray.get(actor.ping.remote(), timeout=deadline_s)
    except ray.exceptions.GetTimeoutError:
        return "silent"
    except (ray.exceptions.RayError, TimeoutError):
        return "dead"
    return "alive"


def _when_the_name_is_free(start: Callable[[], None], deadline_s: float = 30.0) -> None:
    """``start()``, tried again while Ray still holds the dead actor's name."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return start()
        except ValueError as exc:
            if "already taken" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
