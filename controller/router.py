"""The request router: the front door's path from token ids to a (prefill, decode) pair and back. It picks
the pair with the dispatch policy from the latest pushed snapshot, runs prefill, streams token one at once,
hands the request to the decode worker and relays its tokens. Every remote call has a deadline; a dead or
failing worker ends the request with ``WorkerFailed``; a client that goes away aborts the request on every
worker that holds it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from controller.metrics import FrontDoorMetrics
from controller.policy.dispatch import DispatchPlan, DispatchState, decide
from protocol.config import FrontDoorConfig
from protocol.errors import DeadlineExceeded, PdflowError, WorkerFailed
from protocol.ids import RequestId
from protocol.lifecycle import RequestState, advance
from protocol.messages import DecodeRequest, FinishReason, PrefillRequest, SamplingSpec, TokenChunk
from protocol.snapshots import ClusterSnapshot, RequestEvent

log = logging.getLogger(__name__)

EventSink = Callable[[RequestEvent, int, int], None]
_FINAL_STATE = {
    FinishReason.STOP: RequestState.FINISHED_STOP,
    FinishReason.LENGTH: RequestState.FINISHED_LENGTH,
    FinishReason.ABORT: RequestState.FINISHED_ABORTED,
    FinishReason.ERROR: RequestState.FINISHED_ERROR,
}


class RequestRouter:
    def __init__(
        self, config: FrontDoorConfig, namespace: str, metrics: FrontDoorMetrics, events: EventSink
    ) -> None:
        self._config = config
        self._namespace = namespace
        self._metrics = metrics
        self._events = events
        self._snapshot = ClusterSnapshot(version=-1)
        self._dispatch = DispatchState()
        self._active: dict[str, _Flight] = {}

    @property
    def snapshot(self) -> ClusterSnapshot:
        return self._snapshot

    def update_snapshot(self, snapshot: ClusterSnapshot) -> None:
        if snapshot.version >= self._snapshot.version or snapshot.taken_at > self._snapshot.taken_at:
            self._snapshot = snapshot

    def in_flight(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for flight in self._active.values():
            counts[flight.state.value] = counts.get(flight.state.value, 0) + 1
        return counts

    async def abort(self, request_id: RequestId) -> bool:
        flight = self._active.get(request_id)
        if flight is None:
            return False
        flight.abort_requested.set()
        return True

    async def generate(
        self,
        request_id: RequestId,
        prompt_token_ids: tuple[int, ...],
        sampling: SamplingSpec,
        priority: int = 0,
    ) -> AsyncIterator[TokenChunk]:
        try:
            plan, self._dispatch = decide(self._snapshot, self._dispatch, self._config.dispatch)
        except PdflowError:
            self._metrics.requests.labels(outcome="rejected").inc()
            raise
        flight = _Flight(request_id, plan, len(prompt_token_ids), self._events)
        self._active[request_id] = flight
        self._metrics.prompt_tokens.inc(len(prompt_token_ids))
        outcome: RequestState | None = None
        try:
            async for chunk in self._serve(flight, prompt_token_ids, sampling):
                self._metrics.generation_tokens.inc(len(chunk.token_ids))
                flight.output_tokens += len(chunk.token_ids)
                if chunk.finish_reason is not None:
                    outcome = _FINAL_STATE[chunk.finish_reason]
                yield chunk
        except (GeneratorExit, asyncio.CancelledError):
            # The consumer stopped listening: after the last chunk that is just the end of the stream.
            outcome = outcome or RequestState.FINISHED_ABORTED
            raise
        except PdflowError as err:
            flight.detail = err.message
            outcome = RequestState.FINISHED_ERROR
            raise
        finally:
            outcome = outcome or RequestState.FINISHED_ERROR
            self._active.pop(request_id, None)
            flight.finish(outcome)
            self._observe(flight, outcome)

    async def _serve(
        self, flight: _Flight, prompt: tuple[int, ...], sampling: SamplingSpec
    ) -> AsyncIterator[TokenChunk]:
        import ray

        rid = flight.request_id
        prefill_actor = self._actor(flight.plan.prefill.actor_name)
        flight.move(RequestState.PREFILLING)
        request = PrefillRequest(rid, prompt, sampling, hand_off=sampling.max_tokens > 1)
        call = prefill_actor.prefill.remote(request)
        try:
            result = await self._until_aborted(flight, call, self._config.prefill_timeout_s)
        except TimeoutError:
            prefill_actor.abort.remote(rid)
            raise DeadlineExceeded(
                f"prefill on {flight.plan.prefill.instance_id} took longer than "
                f"{self._config.prefill_timeout_s:.0f}s"
            ) from None
        except _Aborted:
            prefill_actor.abort.remote(rid)
            yield TokenChunk(rid, (), FinishReason.ABORT)
            return
        except ray.exceptions.RayError as err:
            raise _worker_failed("prefill", flight.plan.prefill.instance_id, err) from err
        flight.ttft = time.monotonic() - flight.started
        self._metrics.prefill_seconds.observe(result.prefill_seconds)
        if result.finish_reason is not None:
            if result.kv_handle is not None:  # stopped at token one: let the decode side release the KV
                decode_actor = self._actor(flight.plan.decode.actor_name)
                decode_actor.release.remote(
                    DecodeRequest(rid, prompt, result.first_token_id, sampling, result.kv_handle))
            yield TokenChunk(rid, (result.first_token_id,), result.finish_reason)
            return
        yield TokenChunk(rid, (result.first_token_id,))
        flight.move(RequestState.TRANSFERRING)
        async for chunk in self._decode(flight, prompt, sampling, result.first_token_id, result.kv_handle):
            yield chunk

    async def _decode(
        self,
        flight: _Flight,
        prompt: tuple[int, ...],
        sampling: SamplingSpec,
        first: int,
        kv_handle: dict[str, Any] | None,
    ) -> AsyncIterator[TokenChunk]:
        import ray

        rid = flight.request_id
        decode_actor = self._actor(flight.plan.decode.actor_name)
        stream = decode_actor.decode.options(num_returns="streaming").remote(
            DecodeRequest(rid, prompt, first, sampling, kv_handle)
        )
        finished = False
        try:
            while True:
                try:
                    ref = await self._until_aborted(flight, stream.__anext__(), self._config.token_timeout_s)
                    chunk: TokenChunk = await ref
                except StopAsyncIteration:
                    raise WorkerFailed(
                        f"decode worker {flight.plan.decode.instance_id} ended request "
                        f"{rid} without a finish reason"
                    ) from None
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"decode worker {flight.plan.decode.instance_id} sent no token for "
                        f"{self._config.token_timeout_s:.0f}s"
                    ) from None
                except _Aborted:
                    yield TokenChunk(rid, (), FinishReason.ABORT)
                    finished = True
                    return
                except ray.exceptions.RayError as err:
                    raise _worker_failed("decode", flight.plan.decode.instance_id, err) from err
                if flight.state is RequestState.TRANSFERRING:
                    flight.move(RequestState.DECODING)
                finished = chunk.finish_reason is not None
                yield chunk
                if finished:
                    return
        finally:
            if not finished or flight.abort_requested.is_set():
                ray.cancel(stream)
                decode_actor.abort.remote(rid)

    async def _until_aborted(self, flight: _Flight, awaitable: Any, timeout: float) -> Any:
        """Await ``awaitable`` with a deadline; raise ``_Aborted`` if the client aborts first."""
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(flight.abort_requested.wait())
        try:
            done, _ = await asyncio.wait({work, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if work in done:
            return work.result()
        work.cancel()
        if stop in done:
            raise _Aborted
        raise TimeoutError

    def _actor(self, name: str) -> Any:
        import ray

        try:
            return ray.get_actor(name, namespace=self._namespace)
        except ValueError as err:
            raise WorkerFailed(f"worker {name} is gone") from err

    def _observe(self, flight: _Flight, outcome: RequestState) -> None:
        m = self._metrics
        e2e = time.monotonic() - flight.started
        m.requests.labels(outcome=outcome.value.removeprefix("FINISHED_").lower()).inc()
        if outcome in (RequestState.FINISHED_STOP, RequestState.FINISHED_LENGTH):
            m.e2e.observe(e2e)
            if flight.ttft is not None:
                m.ttft.observe(flight.ttft)
                if flight.output_tokens > 1:
                    m.tpot.observe((e2e - flight.ttft) / (flight.output_tokens - 1))


class _Aborted(Exception):
    pass


def _worker_failed(role: str, instance_id: str, err: BaseException) -> WorkerFailed:
    cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return WorkerFailed(f"{role} worker {instance_id} failed: {cause[:300]}")


class _Flight:
    """One request in this front door: its lifecycle state and the figures the metrics need."""

    def __init__(
        self, request_id: RequestId, plan: DispatchPlan, prompt_tokens: int, events: EventSink
    ) -> None:
        self.request_id = request_id
        self.plan = plan
        self.prompt_tokens = prompt_tokens
        self.output_tokens = 0
        self.started = time.monotonic()
        self.ttft: float | None = None
        self.state = RequestState.QUEUED
        self.detail = ""
        self.abort_requested = asyncio.Event()
        self._events = events
        self._emit()

    def move(self, target: RequestState) -> None:
        self.state = advance(self.state, target)
        self._emit()

    def finish(self, outcome: RequestState) -> None:
        if not self.state.is_terminal:
            self.move(outcome)

    def _emit(self) -> None:
        event = RequestEvent(
            self.request_id,
            self.state,
            time.time(),
            self.plan.prefill.instance_id,
            self.plan.decode.instance_id,
            self.detail,
        )
        self._events(event, self.prompt_tokens, self.output_tokens)
