"""Admission: whether a front door takes one more request, or refuses it at once (429 with ``Retry-After``)
rather than let it queue until it misses its first-token deadline, its compute spent for nothing.

Two bounds. A count: at most ``max_waiting`` requests per live prefill worker may wait for their first token
on this front door. And a prediction: the prompt tokens waiting ahead of the new request, plus its own,
divided by the rate at which the prefill pool has been serving this front door's prompts, is the time to its
first token; past ``max_ttft_s`` it is refused. The rate is learned from the requests themselves: each first
token says how many prompt tokens (its own and those ahead of it at its admission) the pool served in the
time it waited, per live prefill worker, and an exponential average keeps it. Until a first token has come,
only the count applies.

Pure: the front door passes the figures in and keeps the state it gets back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SMOOTHING = 0.2  # weight of the newest observation in the average rate


@dataclass(frozen=True, slots=True)
class AdmissionState:
    tokens_per_s: float | None = None  # prompt tokens one live prefill worker serves per second, learned


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    predicted_ttft_s: float | None  # None until the rate is known
    reason: str = ""  # why it was refused, for the client
    retry_after_s: int = 0


def admit(
    state: AdmissionState,
    *,
    waiting_requests: int,
    waiting_tokens: int,
    prompt_tokens: int,
    live_prefill: int,
    max_waiting: int,
    max_ttft_s: float | None,
) -> Admission:
    """Whether a request of ``prompt_tokens`` may join the ``waiting_requests`` (holding ``waiting_tokens``
    prompt tokens) that wait for their first token, with ``live_prefill`` prefill workers serving them."""
    workers = max(1, live_prefill)
    predicted = None
    if state.tokens_per_s:
        predicted = (waiting_tokens + prompt_tokens) / (state.tokens_per_s * workers)
    if waiting_requests >= max_waiting * workers:
        return Admission(
            False,
            predicted,
            f"{waiting_requests} requests already wait for their first token on this front door",
            1,
        )
    if predicted is not None and max_ttft_s is not None and predicted > max_ttft_s and waiting_requests:
        # at least one ahead: a prompt too long for the limit alone is still served when the queue is empty
        return Admission(
            False,
            predicted,
            f"its first token would come in about {predicted:.1f} s, past this server's limit of "
            f"{max_ttft_s:g} s",
            max(1, math.ceil(predicted - max_ttft_s)),
        )
    return Admission(True, predicted)


def observe(
    state: AdmissionState, *, tokens_served: int, waited_s: float, live_prefill: int
) -> AdmissionState:
    """A request's first token came ``waited_s`` after its admission, and the pool served ``tokens_served``
    prompt tokens in that time (its own and those waiting ahead of it)."""
    if waited_s <= 0 or tokens_served <= 0:
        return state
    rate = tokens_served / waited_s / max(1, live_prefill)
    if state.tokens_per_s is None:
        return AdmissionState(rate)
    return AdmissionState((1 - SMOOTHING) * state.tokens_per_s + SMOOTHING * rate)
