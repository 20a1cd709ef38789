"""The admission policy: what it refuses and when, and how it learns the prefill pool's rate."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policy.admission import AdmissionState, admit, observe

LIMITS = {"max_waiting": 64, "max_ttft_s": 4.0}


def _admit(state: AdmissionState, waiting: int, tokens: int, prompt: int = 100, live: int = 1, **kw):
    return admit(
        state,
        waiting_requests=waiting,
        waiting_tokens=tokens,
        prompt_tokens=prompt,
        live_prefill=live,
        **(LIMITS | kw),
    )


def test_until_a_first_token_taught_the_rate_only_the_count_bounds_the_queue() -> None:
    fresh = AdmissionState()
    assert _admit(fresh, 63, 10**9).admitted
    refused = _admit(fresh, 64, 0)
    assert not refused.admitted and refused.retry_after_s == 1 and "64 requests" in refused.reason
    assert _admit(fresh, 127, 0, live=2).admitted  # the count is per live prefill worker


def test_a_request_that_would_wait_past_the_limit_is_refused_with_a_retry_after_of_the_excess() -> None:
    state = AdmissionState(tokens_per_s=1000.0)
    assert _admit(state, 10, 3800).predicted_ttft_s == pytest.approx(3.9)
    assert _admit(state, 10, 3800).admitted
    late = _admit(state, 10, 9900)
    assert not late.admitted and late.predicted_ttft_s == pytest.approx(10.0)
    assert late.retry_after_s == 6 and "about 10.0 s" in late.reason and "4 s" in late.reason
    assert _admit(state, 10, 9900, live=3).admitted  # three workers share the queue
    assert _admit(state, 10, 9900, max_ttft_s=None).admitted  # the prediction is off


def test_a_prompt_too_long_for_the_limit_alone_waits_no_longer_than_others() -> None:
    state = AdmissionState(tokens_per_s=100.0)
    alone = _admit(state, 0, 0, prompt=2000)
    assert alone.admitted and alone.predicted_ttft_s == pytest.approx(20.0)
    assert _admit(state, 3, 390, prompt=2000).admitted  # 3.9 s ahead of it: as much as a short one may wait
    assert not _admit(state, 3, 410, prompt=2000).admitted  # 4.1 s ahead: refused, as a short one would be
    assert not _admit(state, 3, 390, prompt=50).admitted  # 4.4 s in all for a short one: refused


def test_the_rate_is_learned_per_worker_and_smoothed() -> None:
    first = observe(AdmissionState(), tokens_served=3000, waited_s=2.0, live_prefill=2)
    assert first.tokens_per_s == pytest.approx(750.0)
    second = observe(first, tokens_served=1000, waited_s=2.0, live_prefill=1)
    assert second.tokens_per_s == pytest.approx(0.8 * 750 + 0.2 * 500)
    assert observe(second, tokens_served=1000, waited_s=0.0, live_prefill=1) == second
    # a short prompt's first token times the fixed cost of a request, not prefill work: not learned from
    assert observe(second, tokens_served=5, waited_s=0.05, live_prefill=1) == second
    assert observe(AdmissionState(), tokens_served=255, waited_s=1.0, live_prefill=1).tokens_per_s is None


@given(
    rate=st.floats(1.0, 1e6),
    waiting=st.integers(0, 200),
    tokens=st.integers(0, 10**7),
    prompt=st.integers(1, 10**5),
    live=st.integers(0, 8),
)
def test_admitted_requests_are_predicted_within_the_limit_unless_too_long_alone(
    rate: float, waiting: int, tokens: int, prompt: int, live: int
) -> None:
    decision = _admit(AdmissionState(rate), waiting, tokens, prompt, live)
    capacity = rate * max(1, live)
    if decision.admitted:
        assert waiting < 64 * max(1, live)
        assert decision.predicted_ttft_s is not None
        # within the limit, or a prompt too long for it alone that waits behind no more than the limit
        assert decision.predicted_ttft_s <= 4.0 or (prompt / capacity > 4.0 and tokens / capacity <= 4.0)
    else:
        assert decision.retry_after_s >= 1 and decision.reason
