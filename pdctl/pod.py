"""``pdctl pod``: what the containers of the Helm chart (``deploy/helm/pdflow``) run. ``head`` runs the
controller and the front door on the Ray head started in its pod; ``worker`` joins the Ray cluster, hosts one
worker (instance id: the pod's name) on its own node and answers the pod's probes; ``drain`` is the worker
pod's preStop hook: it empties the worker through the controller (live migration for a decode worker)
before Kubernetes stops the pod, so a rolling update or a scale-in loses no request."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any

import typer

from pdctl.admin_client import AdminClient, AdminUnavailable
from pdctl.options import (
    ConfigOpt,
    SetOpt,
    app,
    build_config,
    check_credentials,
    err,
    fail,
    out,
    stop_on_signals,
)
from pdctl.views import drain_summary
from protocol.instances import InstanceState
from protocol.snapshots import Role

pod_app = typer.Typer(
    no_args_is_help=True,
    help="What a Kubernetes pod runs (the Helm chart's containers): the head, a worker, its preStop drain.",
)
app.add_typer(pod_app, name="pod")

RayAddressOpt = Annotated[
    str, typer.Option(help="Ray cluster to join (auto: the one `ray start` began in this pod).")
]
InstanceOpt = Annotated[
    str, typer.Option("--instance-id", envvar="POD_NAME", help="Instance id (default: $POD_NAME).")
]
PROBE_CALL_S = 4.0  # a probe's question to the worker actor (the kubelet waits 5 s)
NAME_FREED_S = 120.0  # Ray notices a dead node within about a minute
PROBES = ("/livez", "/readyz")


@pod_app.command("head")
def head(ray_address: RayAddressOpt = "auto", config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Run the controller and the front door on this pod's Ray node until SIGTERM. With
    kubernetes.pools=kubernetes the workers are the pools' pods, which join by themselves."""
    from pdctl.local_cluster import LocalCluster
    from pdctl.model_cache import model_dir

    cfg = build_config(config, set_)
    check_credentials(cfg, kv=False)  # the workers' pods serve the KV side channels
    try:
        model = model_dir(cfg.model.path)
    except FileNotFoundError as exc:
        fail(str(exc))
    cluster = LocalCluster(cfg, model, ray_address=ray_address, log_to_driver=True)
    stop = stop_on_signals()
    handle = cluster.start(lambda msg: err.print(msg, highlight=False))
    try:
        out.print(
            f"pdflow head serving {cfg.model.name}: HTTP {handle.http_url}, gRPC {handle.grpc_address}, "
            f"admin {handle.admin_address}; pools: {cfg.kubernetes.pools.value}",
            highlight=False,
        )
        while not stop.wait(1.0):
            for name in cluster.supervise():
                err.print(f"{name} was gone: restarted it", highlight=False)
        err.print("stopping...")
    finally:
        cluster.stop()


@pod_app.command("worker")
def worker(
    role: Annotated[Role, typer.Option(help="The pool this pod belongs to.")],
    instance_id: InstanceOpt,
    ray_address: RayAddressOpt = "auto",
    probe_port: Annotated[int, typer.Option(help="Port of /livez and /readyz (0: none).")] = 8081,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Host one worker on this pod's Ray node: start its engine, answer the pod's probes (/readyz: the
    controller took its report within heartbeat_timeout_s and the engine lives; /livez: the worker answers
    and its engine lives), and stop it on SIGTERM (after the preStop drain)."""
    import ray

    from autoscaler.ray_actors import create_worker
    from pdctl.model_cache import model_dir
    from runtime.actors import NAMESPACE

    cfg = build_config(config, set_)
    check_credentials(cfg, api=False, admin=False)  # the head's pod serves those
    if not instance_id:
        fail("no instance id: pass --instance-id or set POD_NAME (the chart sets it from the pod's name)")
    try:
        model = model_dir(cfg.model.path)
    except FileNotFoundError as exc:
        fail(str(exc))
    stop = stop_on_signals()
    ray.init(address=ray_address, namespace=NAMESPACE, log_to_driver=True)
    node = ray.get_runtime_context().get_node_id()
    actor = _create(lambda: create_worker(
        cfg,
        str(model),
        role,
        instance_id,
        f"pdflow-pod-{instance_id}",
        side_channel_port=cfg.worker.nixl_base_port or None,
        node_id=node,
    ), instance_id)  # fmt: skip
    probes = None
    if probe_port:
        probes = ProbeServer(
            probe_port,
            lambda: ray.get(actor.health.remote(), timeout=PROBE_CALL_S),
            cfg.controller.heartbeat_timeout_s,
        )
        probes.start()
    try:
        err.print(f"{instance_id}: starting the {role.value} engine", highlight=False)
        try:
            ray.get(actor.start.remote(), timeout=cfg.worker.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            fail(f"{instance_id}: the engine did not start within {cfg.worker.start_timeout_s:g} s")
        out.print(f"{instance_id}: serving as {role.value}", highlight=False)
        stop.wait()
        err.print(f"{instance_id}: stopping", highlight=False)
    finally:
        if probes is not None:
            probes.stop()
        try:
            ray.get(actor.shutdown.remote(), timeout=30)
        except Exception as exc:  # it may be dead already; it is killed either way
            err.print(f"{instance_id}: shutdown: {exc}", highlight=False)
        ray.kill(actor)
        ray.shutdown()


@pod_app.command("drain")
def drain(
    instance_id: InstanceOpt,
    admin: Annotated[
        str, typer.Option(envvar="PDFLOW_ADMIN", help="Admin API HOST:PORT (default: $PDFLOW_ADMIN).")
    ] = "",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the worker to empty.")] = 240.0,
) -> None:
    """The preStop hook: empty this pod's worker through the controller (cordon, tell the front doors, move
    its running requests away by live migration, wait for what is on its way) before the pod stops. Exits
    0 once it is empty or was never registered; 1 if requests remain when the time is up."""
    if not admin:
        fail("no admin address: pass --admin or set PDFLOW_ADMIN (the chart sets it)")
    try:
        with AdminClient(admin) as client:
            known = {i.instance_id for i in client.instances().instances}
            if instance_id not in known:
                out.print(f"{instance_id}: not registered, nothing to drain", highlight=False)
                return
            result = client.drain(instance_id, timeout)
    except AdminUnavailable as exc:
        fail(str(exc))
    summary = drain_summary(instance_id, result)
    if result.remaining:
        fail(f"{summary}; {result.remaining} still there after {timeout:g}s")
    out.print(f"{summary}; empty", highlight=False)


def _create(make: Callable[[], Any], instance_id: str) -> Any:
    """The worker actor; its name may still be held by this pod's previous run (a restarted container)
    until Ray sees that run's node gone: tried again for a while."""
    deadline = time.monotonic() + NAME_FREED_S
    while True:
        try:
            return make()
        except ValueError as exc:  # "The name pdflow-pod-... is already taken"
            if "already taken" not in str(exc) or time.monotonic() > deadline:
                raise
            err.print(f"{instance_id}: waiting for Ray to free the name of the previous run", highlight=False)
            time.sleep(2.0)


class ProbeServer:
    """``/livez`` and ``/readyz`` for the kubelet, on all addresses of the pod. ``health`` asks the worker
    (``EngineWorker.health``): it raises while the actor is starting, dead or too slow to answer."""

    def __init__(self, port: int, health: Callable[[], dict[str, Any]], heartbeat_timeout_s: float) -> None:
        self._health = health
        self._fresh_s = heartbeat_timeout_s
        probes = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code, body = probes.answer(self.path)
                data = json.dumps(body).encode()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the kubelet gave up
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            def log_message(self, *_args: object) -> None:  # the kubelet asks every few seconds
                pass

        self._server = ThreadingHTTPServer((os.environ.get("PDFLOW_PROBE_HOST", "0.0.0.0"), port), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="probes", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        if path not in PROBES:
            return 404, {"error": f"no such probe {path!r}: /livez or /readyz"}
        try:
            health = self._health()
        except Exception as exc:
            return 503, {"error": f"the worker does not answer: {type(exc).__name__}: {exc}"}
        return self.answer_for(path, health, self._fresh_s)

    @staticmethod
    def answer_for(path: str, health: dict[str, Any], fresh_s: float = 3.0) -> tuple[int, dict[str, Any]]:
        """The probe's answer to what the worker said (``EngineWorker.health``): /livez, 200 while its engine
        lives; /readyz, 200 once it is READY and the controller took its report within ``fresh_s``."""
        if path not in PROBES:
            return 404, {"error": f"no such probe {path!r}: /livez or /readyz"}
        if not health["engine_alive"]:
            return 503, health | {"error": "the engine died"}
        if path == "/livez":
            return 200, health
        ago = health["reported_s_ago"]
        if health["state"] != InstanceState.READY.value or ago is None or ago > fresh_s:
            return 503, health | {"error": "not registered with the controller (no recent report taken)"}
        return 200, health
