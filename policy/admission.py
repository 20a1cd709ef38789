"""Admission: whether a front door takes one more request, or refuses it at once (429 with ``Retry-After``)
rather than let it queue until it misses its first-token deadline, its compute spent for nothing.

Two bounds. A count: at most ``max_waiting`` requests per live prefill worker may wait for their first token
on this front door. And a prediction: the prompt tokens waiting ahead of the new request, plus its own,
divided by the rate at which the prefill pool has been serving this front door's prompts, is the time to its
first token; past ``max_ttft_s`` it is refused. The rate is learned from the requests themselves: each first
token says how many prompt tokens (its own and those ahead of it at its admission) the pool served in the
time it waited, per live prefill worker, and an exponential average keeps it. A first token that came after
fewer than ``MIN_LEARNING_TOKENS`` is not learned from: its time is the fixed cost of a request (dispatch,
one engine step, the hand-off), not prefill work, and would make the pool look slow. Until a first token has
taught the rate, only the count applies.

A prompt too long to meet the limit even alone is refused only while the queue ahead of it alone would
take longer than the limit: it is never refused for good, and it waits behind no more than others do.

Pure: the front door passes the figures in and keeps the state it gets back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SMOOTHING = 0.2  # weight of the newest observation in the average rate
MIN_LEARNING_TOKENS = 256  # prompt tokens served before a first token for it to teach the rate


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
    too_late = False
    if state.tokens_per_s:
        ahead = waiting_tokens / (state.tokens_per_s * workers)
        own = prompt_tokens / (state.tokens_per_s * workers)
        predicted = ahead + own
        if max_ttft_s is not None:
            # a prompt too long for the limit alone: only its wait ahead is bounded
            too_late = (ahead if own > max_ttft_s else predicted) > max_ttft_s
    if waiting_requests >= max_waiting * workers:
        return Admission(
            False,
            predicted,
            f"{waiting_requests} requests already wait for their first token on this front door",
            1,
        )
    if too_late and predicted is not None and max_ttft_s is not None:
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
    if waited_s <= 0 or tokens_served < MIN_LEARNING_TOKENS:
        return state
    rate = tokens_served / waited_s / max(1, live_prefill)
    if state.tokens_per_s is None:
        return AdmissionState(rate)
    return AdmissionState((1 - SMOOTHING) * state.tokens_per_s + SMOOTHING * rate)
