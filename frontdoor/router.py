"""The request router: the front door's path from token ids to a (prefill, decode) pair and back. It picks
the pair with the dispatch policy from the latest pushed snapshot, runs prefill, streams token one at once,
hands the request to the decode worker and relays its tokens. Every remote call has a deadline; a dead or
failing worker ends the request with ``WorkerFailed``; a client that goes away aborts the request on every
worker that holds it. It reaches the workers only through a ``WorkerClient`` (``frontdoor.workers``), and
reads time only through the clocks it is given."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from frontdoor.flight import EventSink, Flight
from frontdoor.metrics import FrontDoorMetrics
from frontdoor.workers import WorkerCallFailed, WorkerClient
from policy.admission import AdmissionState, admit, observe
from policy.dispatch import DispatchState, decide, replacement
from protocol.config import FrontDoorConfig
from protocol.errors import DeadlineExceeded, InvalidRequest, Overloaded, PdflowError, WorkerFailed
from protocol.ids import InstanceId, RequestId
from protocol.lifecycle import RequestState
from protocol.messages import (
    DecodeItem,
    DecodeRequest,
    FinishReason,
    Handover,
    PrefillRequest,
    PrefillResult,
    SamplingSpec,
    TokenChunk,
)
from protocol.snapshots import ClusterSnapshot, Role

log = logging.getLogger(__name__)

_CANCEL_WAIT_S = 5.0  # how long a cancelled call to a worker may take to leave (a Ray call: at once)
_NEEDS_PREFILL = (RequestState.QUEUED, RequestState.PREFILLING, RequestState.TRANSFERRING)
_NEEDS_DECODE = (*_NEEDS_PREFILL, RequestState.MIGRATING)
_WAITING = (RequestState.QUEUED, RequestState.PREFILLING)  # no first token yet
_PREFILL_RETRIES = 1  # another prefill worker after a failed one: the client has received nothing yet
_DECODE_RESUMES = 1  # another decode worker after a lost one, recomputing prompt and tokens so far
_FINAL_STATE = {
    FinishReason.STOP: RequestState.FINISHED_STOP,
    FinishReason.LENGTH: RequestState.FINISHED_LENGTH,
    FinishReason.ABORT: RequestState.FINISHED_ABORTED,
    FinishReason.ERROR: RequestState.FINISHED_ERROR,
}


class RequestRouter:
    def __init__(
        self,
        config: FrontDoorConfig,
        workers: WorkerClient,
        metrics: FrontDoorMetrics,
        events: EventSink,
        *,
        max_predicted_ttft_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``max_predicted_ttft_s``: refuse a request predicted to wait longer for its first token
        (``ClusterConfig.max_predicted_ttft_s``; None: only ``max_waiting`` bounds the queue). ``clock`` times
        requests (latency metrics); ``wall_clock`` is the clock of the instances' ``reported_at`` (dispatch
        compares the two) and of the request events."""
        self._config = config
        self._workers = workers
        self._metrics = metrics
        self._events = events
        self._clock = clock
        self._wall_clock = wall_clock
        self._snapshot = ClusterSnapshot(version=-1)
        self._dispatch = DispatchState()
        self._admission = AdmissionState()
        self._max_predicted_ttft_s = max_predicted_ttft_s
        self._active: dict[str, Flight] = {}

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

    def _admit(self, prompt_tokens: int, priority: int) -> int:
        """Refuse a request (``Overloaded``) that would wait too long for its first token
        (``policy.admission``); else return the prompt tokens it waits behind, its own included. It waits
        behind the requests of its priority or higher only: the prefill engine serves those first, so under
        an overload the more important requests are still admitted while the others are refused."""
        waiting = [f for f in self._active.values() if f.state in _WAITING and f.priority >= priority]
        ahead = sum(f.prompt_tokens for f in waiting) + prompt_tokens
        decision = admit(
            self._admission,
            waiting_requests=len(waiting),
            waiting_tokens=ahead - prompt_tokens,
            prompt_tokens=prompt_tokens,
            live_prefill=len(self._snapshot.live(Role.PREFILL)),
            max_waiting=self._config.max_waiting,
            max_ttft_s=self._max_predicted_ttft_s,
        )
        if not decision.admitted:
            raise Overloaded(
                f"The server is overloaded: {decision.reason}. Please retry after "
                f"{decision.retry_after_s} s.",
                retry_after_s=decision.retry_after_s,
            )
        return ahead

    def inbound(self, instance_id: str) -> int:
        """Requests this front door has planned on ``instance_id`` that still need it but may not show in
        its engine: on a prefill worker, those not yet decoding elsewhere (its KV may still be on its way);
        on a decode worker, those whose hand-off (or migration) to it has not started decoding there. A
        drain of that instance waits for them."""
        return sum(
            1
            for f in self._active.values()
            if (f.plan.prefill.instance_id == instance_id and f.state in _NEEDS_PREFILL)
            or (f.decode_instance == instance_id and f.state in _NEEDS_DECODE)
        )

    async def abort(self, request_id: RequestId) -> bool:
        flight = self._active.get(request_id)
        if flight is None:
            return False
        flight.abort_requested.set()
        return True

    def stopped(self, request_id: RequestId) -> None:
        flight = self._active.get(request_id)
        if flight is not None:
            flight.stopped = True

    async def generate(
        self,
        request_id: RequestId,
        prompt_token_ids: tuple[int, ...],
        sampling: SamplingSpec,
        priority: int = 0,
    ) -> AsyncIterator[TokenChunk]:
        if request_id in self._active:
            raise InvalidRequest(f"request id {request_id!r} is already in flight", param="request_id")
        try:
            now = self._wall_clock()
            plan, dispatch = decide(self._snapshot, self._dispatch, self._config.dispatch, now)  # 503 first
            ahead = self._admit(len(prompt_token_ids), priority)
            self._dispatch = dispatch
        except PdflowError:
            self._metrics.requests.labels(outcome="rejected").inc()
            raise
        flight = Flight(request_id, plan, len(prompt_token_ids), self._events, self._clock, self._wall_clock)
        flight.tokens_ahead = ahead
        flight.priority = priority
        self._active[request_id] = flight
        self._metrics.prompt_tokens.inc(len(prompt_token_ids))
        outcome: RequestState | None = None
        try:
            # closed here, not when garbage collected: its clean-up (aborting the workers' calls, dropping a
            # hand-off's KV) must see the request's state before it is finished
            async with contextlib.aclosing(
                self._serve(flight, prompt_token_ids, sampling, priority)
            ) as chunks:
                async for chunk in chunks:
                    self._metrics.generation_tokens.inc(len(chunk.token_ids))
                    flight.output_tokens += len(chunk.token_ids)
                    if chunk.finish_reason is not None:
                        outcome = _FINAL_STATE[chunk.finish_reason]
                    yield chunk
        except (GeneratorExit, asyncio.CancelledError):
            # The consumer stopped listening: after the last chunk that is just the end of the stream; at a
            # stop string of the client's, the request finished
            if flight.stopped:  # even if the engine's own finish came in the same chunk
                outcome = RequestState.FINISHED_STOP
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
        self, flight: Flight, prompt: tuple[int, ...], sampling: SamplingSpec, priority: int
    ) -> AsyncGenerator[TokenChunk, None]:
        rid = flight.request_id
        flight.move(RequestState.PREFILLING)
        hand_off = sampling.max_tokens > 1
        result = await self._prefill(
            flight,
            PrefillRequest(
                rid,
                prompt,
                sampling,
                hand_off=hand_off,
                kv_destination=flight.plan.decode.kv_endpoint,
                priority=priority,
            ),
        )
        if result is None:
            yield TokenChunk(rid, (), FinishReason.ABORT)
            return
        flight.ttft = self._clock() - flight.started
        self._admission = observe(
            self._admission,
            tokens_served=flight.tokens_ahead,
            waited_s=flight.ttft,
            live_prefill=len(self._snapshot.live(Role.PREFILL)),
        )
        self._metrics.prefill_seconds.observe(result.prefill_seconds)
        if hand_off and result.kv_handle is None and result.finish_reason is None:
            self._after_a_failed_handoff(flight, result)
        handoff = DecodeRequest(rid, prompt, result.first_token_id, sampling, result.kv_handle, priority)
        handed_off = False
        try:
            if result.finish_reason is not None:
                yield TokenChunk(rid, (result.first_token_id,), result.finish_reason)
                return
            yield TokenChunk(rid, (result.first_token_id,))
            flight.transfer = result.transfer
            flight.move(RequestState.TRANSFERRING)
            handed_off = True
            async with contextlib.aclosing(self._decode(flight, handoff)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            if not handed_off and result.kv_handle is not None:
                # The prefill worker holds the prompt's KV for a decode worker that will never ask (the
                # request ended at token one, or the client left): have the decode side release it now.
                self._release(flight, handoff)
            elif handed_off and flight.state is RequestState.TRANSFERRING:
                # It ended (aborted, failed) before its decode worker produced a token, maybe before that
                # worker even started on it: have the prefill worker drop the KV it pushed there.
                self._drop_handoff(flight)

    def _after_a_failed_handoff(self, flight: Flight, result: PrefillResult) -> None:
        """The prompt's KV did not reach the planned decode worker (stopped, gone, unreachable): the request
        goes to the least loaded other live decode worker if there is one (else to the planned one, if it is
        still live), which recomputes the prompt. Whatever part of the KV landed there is dropped."""
        planned = flight.plan.decode
        self._drop_handoff(flight)
        chosen = replacement(self._snapshot, Role.DECODE, {planned.instance_id})
        if chosen is None:
            chosen = replacement(self._snapshot, Role.DECODE, set())
        if chosen is None:
            raise WorkerFailed(
                f"the KV of {flight.request_id} did not reach {planned.instance_id}, and no decode "
                "worker is live"
            )
        flight.plan = replace(flight.plan, decode=chosen)
        why = result.transfer.error if result.transfer is not None else "no transfer record"
        log.warning(
            "%s: its KV did not reach %s (%s); %s recomputes its prompt",
            flight.request_id,
            planned.instance_id,
            why,
            chosen.instance_id,
        )

    async def _prefill(self, flight: Flight, request: PrefillRequest) -> PrefillResult | None:
        """Run prefill with a deadline; None if the client aborted first. Every way out but success aborts
        the prefill on the worker (the worker client does, when its call is cancelled). A prefill worker
        that fails is replaced once by another live one: the client has received nothing yet."""
        tried: set[str] = set()
        while True:
            instance = flight.plan.prefill
            tried.add(instance.instance_id)
            call = self._workers.prefill(instance.actor_name, request)
            try:
                result: PrefillResult = await self._until_aborted(
                    flight, call, self._config.prefill_timeout_s
                )
                return result
            except TimeoutError:
                deadline = self._config.prefill_timeout_s
                raise DeadlineExceeded(
                    f"prefill on {instance.instance_id} took longer than {deadline:.0f}s"
                ) from None
            except _Aborted:
                return None
            except WorkerCallFailed as err:
                failed = _worker_failed("prefill", instance.instance_id, err)
                other = replacement(self._snapshot, Role.PREFILL, tried)
                if len(tried) > _PREFILL_RETRIES or other is None:
                    raise failed from err
                log.warning("%s; %s retried on %s", failed.message, flight.request_id, other.instance_id)
                flight.plan = replace(flight.plan, prefill=other)

    async def _decode(self, flight: Flight, request: DecodeRequest) -> AsyncGenerator[TokenChunk, None]:
        """Relay the decode worker's tokens; when it hands the request over (live migration), go on with the
        destination's stream: the client sees one stream with no gap in its tokens. A decode worker that is
        lost (during the hand-off or mid-stream), or silent past the token deadline, is replaced once by
        another live one, which recomputes the prompt and the tokens sent so far and goes on after them:
        again one stream, no gap, no repeat."""
        hop: tuple[str, str, DecodeRequest] | None = (
            flight.plan.decode.instance_id,
            flight.plan.decode.actor_name,
            request,
        )
        sent = [request.first_token_id]  # every token the client has, across hops
        lost: set[str] = set()
        while hop is not None:
            instance_id, actor_name, hop_request = hop
            flight.decode_instance = InstanceId(instance_id)
            hop = None
            try:
                async with contextlib.aclosing(
                    self._decode_on(flight, instance_id, actor_name, hop_request)
                ) as items:
                    async for item in items:
                        if isinstance(item, Handover):
                            flight.migrations += 1
                            flight.move(RequestState.MIGRATING)
                            hop = (item.target.instance_id, item.target.actor_name, item.continuation)
                            break
                        sent.extend(item.token_ids)
                        yield item
            except _DecodeWorkerLost as gone:
                lost.add(instance_id)
                if flight.state is RequestState.TRANSFERRING:
                    self._drop_handoff(flight)  # the KV pushed to the lost worker is nobody's now
                hop = self._resume_elsewhere(flight, request, sent, lost, gone.error)
                if hop is None:  # the budget was spent when it failed: the request is complete
                    yield TokenChunk(flight.request_id, (), FinishReason.LENGTH)

    def _resume_elsewhere(
        self, flight: Flight, request: DecodeRequest, sent: list[int], lost: set[str], error: PdflowError
    ) -> tuple[str, str, DecodeRequest] | None:
        """Where and how the request goes on after its decode worker was lost: the least loaded other live
        decode worker, recomputing ``request``'s prompt and the ``sent`` tokens (None: nothing is left to
        generate). Raises ``error`` when no other worker may take it."""
        other = replacement(self._snapshot, Role.DECODE, lost)
        if len(lost) > _DECODE_RESUMES or other is None:
            raise error
        left = request.sampling.max_tokens - len(sent)
        if left < 1:
            return None
        tokens = (*request.prompt_token_ids, *sent)
        continuation = DecodeRequest(
            flight.request_id,
            tokens[:-1],
            tokens[-1],
            replace(request.sampling, max_tokens=left + 1),  # the decode worker counts the token it is given
            None,  # no KV: recomputed
            request.priority,
        )
        log.warning(
            "%s; %s resumed on %s after %d tokens",
            error.message,
            flight.request_id,
            other.instance_id,
            len(sent),
        )
        return other.instance_id, other.actor_name, continuation

    async def _decode_on(
        self, flight: Flight, instance_id: str, actor_name: str, request: DecodeRequest
    ) -> AsyncGenerator[DecodeItem, None]:
        """One decode worker's stream, with a deadline on each item. Leaving early (the client aborted, a
        deadline passed, the consumer closed) closes the worker client's stream, which aborts the request
        on that worker."""
        rid = flight.request_id
        async with contextlib.aclosing(self._workers.decode(actor_name, request)) as stream:
            while True:
                try:
                    item = await self._until_aborted(flight, anext(stream), self._config.token_timeout_s)
                except StopAsyncIteration:
                    raise WorkerFailed(
                        f"decode worker {instance_id} ended request {rid} without a finish reason"
                    ) from None
                except TimeoutError:  # a hung engine: the request may go on elsewhere
                    silent = f"sent no token for {self._config.token_timeout_s:.0f}s"
                    raise _DecodeWorkerLost(
                        DeadlineExceeded(f"decode worker {instance_id} {silent}")
                    ) from None
                except _Aborted:
                    yield TokenChunk(rid, (), FinishReason.ABORT)
                    return
                except WorkerCallFailed as err:
                    raise _DecodeWorkerLost(_worker_failed("decode", instance_id, err)) from err
                if isinstance(item, Handover):
                    yield item  # the source ended its side; the request lives on the destination
                    return
                chunk = item
                if flight.state in (RequestState.TRANSFERRING, RequestState.MIGRATING):
                    if chunk.transfer is not None and flight.state is RequestState.TRANSFERRING:
                        flight.transfer = chunk.transfer  # the receiver's record adds the decode seconds
                        self._metrics.observe_transfer(chunk.transfer)
                    flight.move(RequestState.DECODING)
                if chunk.finish_reason in (FinishReason.ERROR, FinishReason.ABORT):
                    # vLLM ended it (a failed KV pull, an engine error): tokens so far, then a typed error.
                    if chunk.token_ids:
                        yield TokenChunk(rid, chunk.token_ids)
                    raise WorkerFailed(
                        f"decode worker {instance_id} could not finish request {rid} "
                        f"({chunk.finish_reason.value}); its KV pull may have failed"
                    )
                yield chunk
                if chunk.finish_reason is not None:
                    return

    async def _until_aborted(self, flight: Flight, awaitable: Any, timeout: float) -> Any:
        """Await ``awaitable`` with a deadline; raise ``_Aborted`` if the client aborts first. Work that did
        not finish is cancelled, and waited for: a worker's stream must have left its step before it is
        closed."""
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(flight.abort_requested.wait())
        try:
            done, _ = await asyncio.wait({work, stop}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not work.done():
                work.cancel()
                await asyncio.wait({work}, timeout=_CANCEL_WAIT_S)
        if work in done:
            return work.result()
        if stop in done:
            raise _Aborted
        raise TimeoutError

    def _release(self, flight: Flight, handoff: DecodeRequest) -> None:
        self._workers.release(flight.plan.decode.actor_name, handoff)

    def _drop_handoff(self, flight: Flight) -> None:
        prefill, decode = flight.plan.prefill, flight.plan.decode
        self._workers.drop_handoff(prefill.actor_name, flight.request_id, decode.kv_endpoint)

    def _observe(self, flight: Flight, outcome: RequestState) -> None:
        m = self._metrics
        e2e = self._clock() - flight.started
        m.requests.labels(outcome=outcome.value.removeprefix("FINISHED_").lower()).inc()
        if outcome in (RequestState.FINISHED_STOP, RequestState.FINISHED_LENGTH):
            m.e2e.observe(e2e)
            if flight.ttft is not None:
                m.ttft.observe(flight.ttft)
                if flight.output_tokens > 1:
                    m.tpot.observe((e2e - flight.ttft) / (flight.output_tokens - 1))


class _Aborted(Exception):
    pass


class _DecodeWorkerLost(Exception):
    """A decode worker's call failed (it died, its stream broke) or it sent nothing for the token deadline
    (its engine hung): the request may go on elsewhere. ``error`` is the client's if it cannot."""

    def __init__(self, error: PdflowError) -> None:
        super().__init__(error.message)
        self.error = error


def _worker_failed(role: str, instance_id: str, err: BaseException) -> WorkerFailed:
    cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return WorkerFailed(f"{role} worker {instance_id} failed: {cause[:300]}")
