"""How the request router reaches the workers: the ``WorkerClient`` interface, its Ray implementation (the
front door's only Ray code besides its actor shell), and an in-process one over worker objects (tests, and
runs without Ray).

Contract of every implementation: ``prefill`` and ``decode`` raise ``WorkerCallFailed`` when the worker is
gone or its call failed. Cancelling a ``prefill`` call, or closing a ``decode`` stream before its last item,
aborts the request on that worker (its KV blocks are freed there). ``release``, ``drop_handoff`` and
``abort`` are fire-and-forget: they never block and never raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any, Protocol

from protocol.messages import DecodeItem, DecodeRequest, Handover, PrefillRequest, PrefillResult
from runtime.actors import ActorDirectory, ActorGone

log = logging.getLogger(__name__)


class WorkerCallFailed(Exception):
    """The worker is gone, or its call failed; the message says why."""


class WorkerClient(Protocol):
    async def prefill(self, worker: str, request: PrefillRequest) -> PrefillResult:
        """Run ``request`` on prefill worker ``worker`` (an actor name)."""

    def decode(self, worker: str, request: DecodeRequest) -> AsyncGenerator[DecodeItem, None]:
        """Stream ``request``'s tokens from decode worker ``worker``; ends with a finished chunk or a
        ``Handover``."""

    def release(self, worker: str, request: DecodeRequest) -> None:
        """Have decode worker ``worker`` load and drop the KV of a request that ended at its first token."""

    def drop_handoff(self, worker: str, request_id: str, destination: str) -> None:
        """Have prefill worker ``worker`` drop the KV it pushed to ``destination`` for ``request_id``."""

    def abort(self, worker: str, request_id: str) -> None:
        """Abort ``request_id`` on ``worker``."""


class RayWorkerClient:
    """Workers as Ray actors, found through one cached ``ActorDirectory``."""

    def __init__(self, actors: ActorDirectory) -> None:
        self._actors = actors
        self._background: set[asyncio.Task[Any]] = set()

    async def prefill(self, worker: str, request: PrefillRequest) -> PrefillResult:
        import ray

        handle = await self._handle(worker)
        call = handle.prefill.remote(request)
        try:
            result: PrefillResult = await call
            return result
        except ray.exceptions.RayError as err:
            self._actors.forget(worker)
            raise WorkerCallFailed(_cause(err)) from err
        except BaseException:  # cancelled (deadline, client gone): stop it there too
            self._cancel(handle, request.request_id, call)
            raise

    async def decode(self, worker: str, request: DecodeRequest) -> AsyncGenerator[DecodeItem, None]:
        import ray

        handle = await self._handle(worker)
        stream = handle.decode.options(num_returns="streaming").remote(request)
        finished = False
        try:
            async for ref in stream:
                item: DecodeItem = await ref
                finished = isinstance(item, Handover) or item.finish_reason is not None
                yield item
                if finished:
                    return
        except ray.exceptions.RayError as err:
            self._actors.forget(worker)
            raise WorkerCallFailed(_cause(err)) from err
        finally:
            if not finished:
                self._cancel(handle, request.request_id, stream)

    def release(self, worker: str, request: DecodeRequest) -> None:
        self._fire(worker, "release", request)

    def drop_handoff(self, worker: str, request_id: str, destination: str) -> None:
        self._fire(worker, "drop_handoff", request_id, destination)

    def abort(self, worker: str, request_id: str) -> None:
        self._fire(worker, "abort", request_id)

    async def _handle(self, worker: str) -> Any:
        try:
            return await self._actors.handle(worker)
        except ActorGone as err:
            raise WorkerCallFailed(f"worker {worker} is gone") from err

    def _fire(self, worker: str, method: str, *args: Any) -> None:
        async def call() -> None:
            try:
                handle = await self._actors.handle(worker)
                getattr(handle, method).remote(*args)
            except Exception as exc:  # the worker may be gone already; then so is what it held
                log.info("%s on %s not delivered: %s", method, worker, exc)

        task = asyncio.get_running_loop().create_task(call())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _cancel(self, handle: Any, request_id: str, call: Any) -> None:
        """Fire-and-forget: cancel the Ray call and abort the request in the worker's engine."""
        import ray

        with contextlib.suppress(Exception):  # the worker may be gone already; then so is the request
            ray.cancel(call)
        with contextlib.suppress(Exception):
            handle.abort.remote(request_id)


class LocalWorkerClient:
    """Worker objects in this process (``PrefillWorker``/``DecodeWorker`` instances, by actor name), called
    directly. ``fail(worker)`` makes a worker's calls fail from then on, as a dead actor's would."""

    def __init__(self, workers: dict[str, Any]) -> None:
        self.workers = workers
        self._failed: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()

    def fail(self, worker: str) -> None:
        self._failed.add(worker)

    async def prefill(self, worker: str, request: PrefillRequest) -> PrefillResult:
        target = self._worker(worker)
        try:
            result: PrefillResult = await target.prefill(request)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            raise WorkerCallFailed(_cause(err)) from err
        self._check(worker)
        return result

    async def decode(self, worker: str, request: DecodeRequest) -> AsyncGenerator[DecodeItem, None]:
        target = self._worker(worker)
        async with contextlib.aclosing(target.decode(request)) as items:
            try:
                async for item in items:
                    self._check(worker)
                    yield item
            except (WorkerCallFailed, GeneratorExit, asyncio.CancelledError):
                raise
            except Exception as err:
                raise WorkerCallFailed(_cause(err)) from err

    def release(self, worker: str, request: DecodeRequest) -> None:
        self._fire(worker, "release", request)

    def drop_handoff(self, worker: str, request_id: str, destination: str) -> None:
        self._fire(worker, "drop_handoff", request_id, destination)

    def abort(self, worker: str, request_id: str) -> None:
        self._fire(worker, "abort", request_id)

    async def settled(self) -> None:
        """Wait for the fire-and-forget calls made so far."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def _worker(self, worker: str) -> Any:
        self._check(worker)
        target = self.workers.get(worker)
        if target is None:
            raise WorkerCallFailed(f"worker {worker} is gone")
        return target

    def _check(self, worker: str) -> None:
        if worker in self._failed:
            raise WorkerCallFailed(f"worker {worker} died")

    def _fire(self, worker: str, method: str, *args: Any) -> None:
        async def call() -> None:
            with contextlib.suppress(Exception):
                await getattr(self._worker(worker), method)(*args)

        task = asyncio.get_running_loop().create_task(call())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _cause(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[-1] if text else type(err).__name__)[:300]
