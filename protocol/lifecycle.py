"""The request lifecycle: one enum, one transition table; illegal transitions raise."""

from __future__ import annotations

import enum


class RequestState(enum.StrEnum):
    QUEUED = "QUEUED"
    PREFILLING = "PREFILLING"
    TRANSFERRING = "TRANSFERRING"
    DECODING = "DECODING"
    MIGRATING = "MIGRATING"
    FINISHED_STOP = "FINISHED_STOP"
    FINISHED_LENGTH = "FINISHED_LENGTH"
    FINISHED_ABORTED = "FINISHED_ABORTED"
    FINISHED_ERROR = "FINISHED_ERROR"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {
        RequestState.FINISHED_STOP,
        RequestState.FINISHED_LENGTH,
        RequestState.FINISHED_ABORTED,
        RequestState.FINISHED_ERROR,
    }
)
_ENDINGS = frozenset({RequestState.FINISHED_ABORTED, RequestState.FINISHED_ERROR})

# A prefill that already produced the last token (stop token, or max_tokens == 1) finishes without decode;
# a short prompt may be prefilled on the decode worker itself (conditional disaggregation: QUEUED → DECODING).
TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    RequestState.QUEUED: frozenset({RequestState.PREFILLING, RequestState.DECODING}) | _ENDINGS,
    RequestState.PREFILLING: frozenset(
        {RequestState.TRANSFERRING, RequestState.FINISHED_STOP, RequestState.FINISHED_LENGTH}
    )
    | _ENDINGS,
    RequestState.TRANSFERRING: frozenset({RequestState.DECODING}) | _ENDINGS,
    RequestState.DECODING: frozenset(
        {RequestState.MIGRATING, RequestState.FINISHED_STOP, RequestState.FINISHED_LENGTH}
    )
    | _ENDINGS,
    RequestState.MIGRATING: frozenset({RequestState.DECODING}) | _ENDINGS,
    **{state: frozenset() for state in TERMINAL_STATES},
}


class IllegalTransition(RuntimeError):
    def __init__(self, current: RequestState, target: RequestState) -> None:
        super().__init__(f"illegal request transition {current.value} -> {target.value}")
        self.current = current
        self.target = target


def advance(current: RequestState, target: RequestState) -> RequestState:
    """Return ``target`` if the table allows ``current -> target``, else raise ``IllegalTransition``."""
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(current, target)
    return target
