from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kv_transfer.transport.arena import ALIGNMENT, Arena, ArenaFull


def test_reserve_is_idempotent_per_key_and_release_frees() -> None:
    arena = Arena(1024)
    first = arena.reserve("a", 100, now=0.0, lease_s=10)
    assert arena.reserve("a", 100, now=1.0, lease_s=10) == first
    assert first.nbytes == 128 and first.offset % ALIGNMENT == 0
    assert arena.release("a") and not arena.release("a")
    assert arena.used_bytes == 0


def test_full_arena_raises_and_reuses_gaps() -> None:
    arena = Arena(512)
    arena.reserve("a", 256, now=0, lease_s=10)
    arena.reserve("b", 256, now=0, lease_s=10)
    with pytest.raises(ArenaFull, match="staging arena full"):
        arena.reserve("c", 64, now=0, lease_s=10)
    arena.release("a")
    assert arena.reserve("c", 64, now=0, lease_s=10).offset == 0
    with pytest.raises(ValueError, match="more than the whole arena"):
        arena.reserve("d", 4096, now=0, lease_s=10)


def test_leases_expire() -> None:
    arena = Arena(1024)
    arena.reserve("a", 64, now=0, lease_s=5)
    arena.reserve("b", 64, now=0, lease_s=50)
    assert arena.expire(4.9) == []
    assert arena.expire(5.0) == ["a"]
    assert arena.keys == ["b"]


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 300)), max_size=60))
def test_regions_never_overlap(ops: list[tuple[bool, int]]) -> None:
    arena = Arena(4096)
    live: list[str] = []
    for i, (release, size) in enumerate(ops):
        if release and live:
            arena.release(live.pop(0))
            continue
        try:
            arena.reserve(str(i), size, now=0, lease_s=1)
            live.append(str(i))
        except ArenaFull:
            pass
    regions = sorted((r for r in (arena.region(k) for k in live) if r is not None), key=lambda r: r.offset)
    for a, b in itertools.pairwise(regions):
        assert a.end <= b.offset
    assert all(r.end <= arena.capacity for r in regions)
