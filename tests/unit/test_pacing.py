"""``Pacer`` and the pre-copy's rate: a migration's pre-copy spreads its sends so that they average at most
the configured rate, and never holds up its first send."""

from __future__ import annotations

import pytest

from kv_transfer.exchange.pacing import CPU_PRECOPY_GBPS, Pacer, precopy_rate


class _Clock:
    """A clock that only moves when the pacer sleeps (sends themselves take no time)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_sends_leave_at_the_rate_and_the_first_goes_at_once() -> None:
    clock = _Clock()
    pace = Pacer(1000.0, clock=clock, sleep=clock.sleep)
    sent_at = []
    for nbytes in (500, 500, 1000, 250):
        pace.wait(nbytes)
        sent_at.append(clock.now - 100.0)
    # each send waits until the bytes before it fit 1000 B/s
    assert sent_at == pytest.approx([0.0, 0.5, 1.0, 2.0])


def test_time_spent_elsewhere_counts_toward_the_rate() -> None:
    clock = _Clock()
    pace = Pacer(1000.0, clock=clock, sleep=clock.sleep)
    pace.wait(1000)
    clock.now += 3.0  # the sender was slow (a slow link, or a busy core): the next send is already due
    pace.wait(1000)
    assert clock.sleeps == []
    pace.wait(1000)  # 2000 B sent in 3 s: due at 2 s, so it goes at once too
    assert clock.sleeps == []


@pytest.mark.parametrize("rate", [0.0, -1.0])
def test_a_rate_must_be_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        Pacer(rate)


def test_the_default_caps_cpu_engines_only_and_zero_means_no_cap() -> None:
    assert precopy_rate(None, "cpu") == pytest.approx(CPU_PRECOPY_GBPS * 1e9)
    assert precopy_rate(None, "cuda") is None
    assert precopy_rate(0.0, "cpu") is None
    assert precopy_rate(2.5, "cuda") == pytest.approx(2.5e9)
