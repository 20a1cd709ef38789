"""What the fake engine computes, with no model and no torch: the next token of a sequence, how long an
engine step takes, and in which order waiting prompts get their turn (by priority, as vLLM's scheduler). A
pure function, a table and a queue; the fake engine (``engine.fake_engine``) runs them, and the simulator's
engine will take the same latency model."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

VOCAB = 49152


def next_token(sequence: Sequence[int]) -> int:
    """The token that follows ``sequence``."""
    h = len(sequence)
    for token in sequence[-8:]:
        h = (h * 1_000_003 + token + 1) % 2_147_483_647
    return h % VOCAB


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """Seconds an engine spends, by table: linear between the points, flat beyond the ends. ``prefill``:
    (prompt tokens, seconds); ``decode``: (running requests, seconds per step)."""

    prefill: tuple[tuple[int, float], ...] = ((1, 0.0005), (2048, 0.005))
    decode: tuple[tuple[int, float], ...] = ((1, 0.0005), (32, 0.002))

    def prefill_s(self, tokens: int) -> float:
        return _interpolate(self.prefill, tokens)

    def step_s(self, batch: int) -> float:
        return _interpolate(self.decode, batch)


def _interpolate(table: tuple[tuple[int, float], ...], x: int) -> float:
    xs = [p[0] for p in table]
    i = bisect.bisect_left(xs, x)
    if i == 0:
        return table[0][1]
    if i == len(table):
        return table[-1][1]
    (x0, y0), (x1, y1) = table[i - 1], table[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class PriorityTurns:
    """One holder at a time; waiters get their turn by priority (higher first), then by arrival."""

    def __init__(self) -> None:
        self._busy = False
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    @contextlib.asynccontextmanager
    async def turn(self, priority: int) -> AsyncIterator[None]:
        if self._busy or self._waiting:
            entry = (-priority, next(self._arrivals), asyncio.get_running_loop().create_future())
            heapq.heappush(self._waiting, entry)
            try:
                await entry[2]
            except BaseException:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                    heapq.heapify(self._waiting)
                elif entry[2].done() and not entry[2].cancelled():
                    self._pass_on()  # it was handed the turn just as it left
                raise
        self._busy = True
        try:
            yield
        finally:
            self._pass_on()

    def _pass_on(self) -> None:
        while self._waiting:
            _, _, waiter = heapq.heappop(self._waiting)
            if not waiter.done():
                waiter.set_result(None)  # busy stays set: the turn goes straight to it
                return
        self._busy = False
