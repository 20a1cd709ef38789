"""The front door: a Ray actor serving the OpenAI-compatible HTTP API and the gRPC Router API for one
replica. It tokenizes, dispatches through ``RequestRouter`` from the snapshot the controller pushes, and
reports each request's state changes to the controller in batches."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from frontdoor.metrics import FrontDoorMetrics
from frontdoor.router import RequestRouter
from frontdoor.tracing import RequestTracer
from frontdoor.workers import RayWorkerClient
from protocol.auth import Credentials
from protocol.config import ClusterConfig
from protocol.lifecycle import RequestState
from protocol.snapshots import ClusterSnapshot, RequestEvent, Role
from runtime.actors import ActorDirectory

log = logging.getLogger(__name__)
_EVENT_FLUSH_S = 0.1
_CONTROLLER_CALL_S = 10.0


class FrontDoor:
    def __init__(
        self, config: dict[str, Any], model_path: str, namespace: str, controller_name: str, actor_name: str
    ) -> None:
        self.config = ClusterConfig.model_validate(config)
        self._model_path = model_path
        self._controller_name = controller_name
        self._actor_name = actor_name
        self._pending: list[tuple[RequestEvent, int, int]] = []
        self._actors = ActorDirectory(namespace)
        self.metrics = FrontDoorMetrics(lambda: self.router.snapshot)
        self.router = RequestRouter(
            self.config.frontdoor,
            RayWorkerClient(self._actors),
            self.metrics,
            self._queue_event,
            max_predicted_ttft_s=self.config.max_predicted_ttft_s,
        )
        self._tracer = RequestTracer.from_config(self.config.tracing)  # None: tracing is off
        self._http: Any = None
        self._grpc: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.addresses: dict[str, str] = {}

    async def start(self) -> dict[str, str]:
        """Bind the HTTP and gRPC servers, subscribe to the controller; return their addresses."""
        import uvicorn

        from frontdoor.grpc_api import start_grpc_server
        from frontdoor.http_api import build_http_app
        from frontdoor.http_guard import http_protocol, local_names
        from frontdoor.textgen import TextGenerator
        from frontdoor.tokenizer import ModelTokenizer

        fd = self.config.frontdoor
        credentials = Credentials.from_env()
        credentials.require_api_keys_for(fd.host)
        tls = fd.tls_pair()
        tokenizer = ModelTokenizer(self._model_path)
        textgen = TextGenerator(
            self.router,
            tokenizer,
            model_name=self.config.model.name,
            max_model_len=self.config.engine.max_model_len,
            default_max_tokens=fd.default_max_tokens,
            max_concurrent_per_key=fd.max_concurrent_per_key,
        )
        app = build_http_app(
            textgen,
            model_name=self.config.model.name,
            metrics_text=self._metrics_text,
            health=self.health,
            max_body_bytes=fd.max_body_bytes,
            allowed_hosts=local_names(fd.host),
            credentials=credentials,
        )
        self._http = uvicorn.Server(
            uvicorn.Config(
                app,
                host=fd.host,
                port=fd.http_port,
                log_level="warning",
                lifespan="off",
                timeout_graceful_shutdown=2,
                http=http_protocol(),
                ssl_certfile=fd.tls_cert_file,
                ssl_keyfile=fd.tls_key_file,
            )
        )
        self._tasks.append(asyncio.create_task(self._http.serve()))
        while not self._http.started:
            if self._tasks[0].done():
                self._tasks[0].result()
                raise RuntimeError(f"HTTP server could not bind {fd.host}:{fd.http_port}")
            await asyncio.sleep(0.05)
        http_port = self._http.servers[0].sockets[0].getsockname()[1]
        self._grpc, grpc_port = await start_grpc_server(
            textgen, fd.host, fd.grpc_port, health_check=self.health, credentials=credentials, tls=tls
        )
        scheme = "https" if tls else "http"
        self.addresses = {"http": f"{scheme}://{fd.host}:{http_port}", "grpc": f"{fd.host}:{grpc_port}"}
        await self._subscribe()
        self._tasks.append(asyncio.create_task(self._flush_loop()))
        self._tasks.append(asyncio.create_task(self._resubscribe_loop()))
        return self.addresses

    async def _subscribe(self) -> None:
        snapshot: ClusterSnapshot = await self._actors.call(
            self._controller_name,
            "subscribe",
            self._actor_name,
            self.addresses["http"],
            self.addresses["grpc"],
            timeout_s=_CONTROLLER_CALL_S,
        )
        self.router.update_snapshot(snapshot)

    async def _resubscribe_loop(self) -> None:
        """A controller that stops pushing snapshots may have been restarted, knowing no front door: once the
        snapshot is older than the heartbeat timeout, subscribe again (to whichever actor has the name now),
        and keep trying while it is gone. Meanwhile ``health`` says the snapshot is stale."""
        stale_after = self.config.controller.heartbeat_timeout_s
        while True:
            await asyncio.sleep(stale_after / 2)
            taken_at = self.router.snapshot.taken_at
            if taken_at and time.time() - taken_at <= stale_after:
                continue
            try:
                await self._subscribe()
                log.warning("the controller's snapshots had stopped; subscribed again")
            except Exception as exc:
                log.warning("the controller's snapshots stopped and it cannot be reached: %s", exc)

    def update_snapshot(self, snapshot: ClusterSnapshot) -> None:
        self.router.update_snapshot(snapshot)

    def inbound(self, instance_id: str) -> int:
        """Requests planned on ``instance_id`` that still need it before it can go (a drain waits)."""
        return self.router.inbound(instance_id)

    def ping(self) -> str:
        return self._actor_name

    def snapshot_version(self) -> int:
        return self.router.snapshot.version

    def requests_in_flight(self) -> int:
        """Requests this front door is serving (leak check)."""
        return sum(self.router.in_flight().values())

    def health(self) -> dict[str, Any]:
        """Serving needs a live worker of each role in a fresh snapshot. A snapshot older than the heartbeat
        timeout means the controller stopped pushing: the pools may have changed without this front door
        knowing, so it reports itself unhealthy (and keeps serving on what it last knew)."""
        snap = self.router.snapshot
        prefill, decode = len(snap.live(Role.PREFILL)), len(snap.live(Role.DECODE))
        age = time.time() - snap.taken_at if snap.taken_at else None
        fresh = age is not None and age <= self.config.controller.heartbeat_timeout_s
        health: dict[str, Any] = {
            "ok": prefill > 0 and decode > 0 and fresh,
            "prefill_workers": prefill,
            "decode_workers": decode,
            "snapshot_version": snap.version,
            "snapshot_age_s": age,
        }
        if not fresh:
            health["reason"] = "no recent cluster snapshot from the controller"
        elif not prefill or not decode:
            health["reason"] = f"the {'prefill' if not prefill else 'decode'} pool is empty"
        return health

    def _metrics_text(self) -> tuple[bytes, str]:
        counts = self.router.in_flight()
        for state in RequestState:  # every state, 0 included: one that empties must not keep its last count
            if not state.is_terminal:
                self.metrics.in_flight.labels(state=state.value).set(counts.get(state.value, 0))
        return self.metrics.exposition()

    def _queue_event(self, event: RequestEvent, prompt_tokens: int, output_tokens: int) -> None:
        self._pending.append((event, prompt_tokens, output_tokens))
        if self._tracer is not None:
            self._tracer.on_event(event, prompt_tokens, output_tokens)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(_EVENT_FLUSH_S)
            if not self._pending:
                continue
            batch, self._pending = self._pending, []
            try:  # sent, not awaited: a slow controller must not hold up (or lose) the next batches
                controller = await self._actors.handle(self._controller_name)
                controller.record_events.remote(batch)
            except Exception as exc:  # the controller is gone
                self._actors.forget(self._controller_name)
                log.warning("controller unreachable (%s); dropped %d request events", exc, len(batch))

    async def shutdown(self) -> None:
        if self._tracer is not None:
            self._tracer.shutdown()  # exports what it holds
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        if self._http is not None:
            self._http.should_exit = True
        for task in self._tasks[1:]:
            task.cancel()
