"""Spread a run of sends over time so that it averages at most a given rate.

A migration's pre-copy copies the request's KV while the source engine keeps computing tokens. On a CPU engine
the copy takes the cores and the memory bandwidth the forward pass runs on: sent at full speed, a 4096-token
request's 94 MB cost the source's requests 20-30 ms of compute within two or three steps, +15-45% on their
time per token while it lasted. Sent at a capped rate, the same cost spreads over many steps. The pre-copy is
off the request's critical path; only the last push (paused request) is never paced."""

from __future__ import annotations

import time
from collections.abc import Callable


class Pacer:
    """Before each send, ``wait(nbytes)`` sleeps until the bytes sent before it fit ``rate`` bytes a second
    from the first send on: the first send goes at once, the n-th once ``sent / rate`` seconds have passed.
    It sleeps (the thread gives up the interpreter) rather than spinning."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"a pacing rate must be positive, not {rate}")
        self._rate = rate
        self._clock = clock
        self._sleep = sleep
        self._start: float | None = None
        self._sent = 0

    def wait(self, nbytes: int) -> None:
        now = self._clock()
        if self._start is None:
            self._start = now
        due = self._start + self._sent / self._rate
        if due > now:
            self._sleep(due - now)
        self._sent += nbytes


def precopy_rate(gbps: float | None, device: str) -> float | None:
    """Bytes a second a pre-copy may average (None: no cap): ``gbps`` as configured (0: no cap), or, unset,
    ``CPU_PRECOPY_GBPS`` for a KV cache in host memory and no cap on an accelerator (whose copies leave the
    compute alone)."""
    if gbps is None:
        gbps = CPU_PRECOPY_GBPS if device == "cpu" else 0.0
    return gbps * 1e9 if gbps > 0 else None


CPU_PRECOPY_GBPS = 0.1
"""The default cap on a CPU engine: a 4096-token SmolLM2 request (94 MB) pre-copies in about 0.9 s, over 15 or
so of the source's steps. The copy's CPU cost is the same at any rate; spread thinner, it costs each of the
source's tokens less (two vCPUs, two engines, 4096 tokens: +30% and +12% per token at 0.25 GB/s, +5% and +22%
at 0.1 GB/s, runs of 4-9 migrations, so within the noise of this machine), and the migrating request's own
largest gap during the pre-copy fell from 80-166 to 63-115 ms."""
