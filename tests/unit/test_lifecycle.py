from __future__ import annotations

import pytest

from protocol.lifecycle import TERMINAL_STATES, TRANSITIONS, IllegalTransition, RequestState, advance


def test_happy_path_of_a_disaggregated_request() -> None:
    state = RequestState.QUEUED
    for nxt in (
        RequestState.PREFILLING,
        RequestState.TRANSFERRING,
        RequestState.DECODING,
        RequestState.MIGRATING,
        RequestState.DECODING,
        RequestState.FINISHED_LENGTH,
    ):
        state = advance(state, nxt)
    assert state.is_terminal


@pytest.mark.parametrize("terminal", sorted(TERMINAL_STATES))
def test_terminal_states_go_nowhere(terminal: RequestState) -> None:
    for target in RequestState:
        with pytest.raises(IllegalTransition):
            advance(terminal, target)


def test_illegal_transition_names_both_states() -> None:
    with pytest.raises(IllegalTransition, match="QUEUED -> TRANSFERRING"):
        advance(RequestState.QUEUED, RequestState.TRANSFERRING)


def test_every_live_state_can_fail_or_be_aborted() -> None:
    for state, targets in TRANSITIONS.items():
        if not state.is_terminal:
            assert {RequestState.FINISHED_ABORTED, RequestState.FINISHED_ERROR} <= targets
