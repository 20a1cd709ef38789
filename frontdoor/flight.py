"""One request in a front door (``Flight``): its lifecycle state, where it runs, and the figures the metrics
need. Each state change goes out as a ``RequestEvent`` to the sink the router is given (the controller's
request log)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from policy.dispatch import DispatchPlan
from protocol.ids import RequestId
from protocol.lifecycle import RequestState, advance
from protocol.snapshots import RequestEvent
from protocol.transfers import TransferRecord

EventSink = Callable[[RequestEvent, int, int], None]


class Flight:
    """One request in this front door: its lifecycle state and the figures the metrics need."""

    def __init__(
        self,
        request_id: RequestId,
        plan: DispatchPlan,
        prompt_tokens: int,
        events: EventSink,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self.request_id = request_id
        self.plan = plan
        self.prompt_tokens = prompt_tokens
        self.tokens_ahead = prompt_tokens  # prompt tokens waiting at its admission, its own included
        self.priority = 0  # from the API: higher is served first
        self.output_tokens = 0
        self._wall_clock = wall_clock
        self.started = clock()
        self.ttft: float | None = None
        self.state = RequestState.QUEUED
        self.detail = ""
        self.transfer: TransferRecord | None = None
        self.decode_instance = plan.decode.instance_id  # where it decodes now (it may migrate)
        self.migrations = 0
        self.abort_requested = asyncio.Event()
        self.stopped = False  # the client's stop string ended it (``RequestRouter.stopped``)
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
            self._wall_clock(),
            self.plan.prefill.instance_id,
            self.decode_instance,
            self.detail,
            self.transfer,
        )
        self._events(event, self.prompt_tokens, self.output_tokens)
