"""``LayeredCopy``: the copies of landed KV that run layer by layer beside a step's forward pass."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from kv_transfer.vllm.layered_copy import LayeredCopy


@pytest.fixture
def pool():  # type: ignore[no-untyped-def]
    with ThreadPoolExecutor(max_workers=1) as p:
        yield p


def test_a_layer_is_ready_once_its_copies_ran_and_layers_run_in_order(pool: ThreadPoolExecutor) -> None:
    ran: list[tuple[int, str]] = []
    gate = threading.Event()
    copy = LayeredCopy(3)
    copy.add(0, "a", lambda: ran.append((0, "a")))
    copy.add(1, "a", lambda: (gate.wait(10), ran.append((1, "a"))))
    copy.add(1, "b", lambda: ran.append((1, "b")))
    copy.add(2, "b", lambda: ran.append((2, "b")))
    copy.start(pool)
    assert copy.wait(0, timeout_s=10)
    assert ran == [(0, "a")]
    assert not copy.wait(1, timeout_s=0.05), "layer 1 reported ready while its copy was still running"
    assert not copy.wait(2, timeout_s=0.01)
    gate.set()
    assert copy.wait(2, timeout_s=10) and copy.join(timeout_s=10)
    assert ran == [(0, "a"), (1, "a"), (1, "b"), (2, "b")]
    assert copy.errors == {} and set(copy.seconds) == {"a", "b"}


def test_a_failed_copy_ends_its_owners_copies_and_no_one_elses(pool: ThreadPoolExecutor) -> None:
    ran: list[tuple[int, str]] = []
    copy = LayeredCopy(3)

    def broken() -> None:
        raise ValueError("block images of another layout")

    copy.add(0, "bad", broken)
    for layer in range(3):
        copy.add(layer, "bad", lambda layer=layer: ran.append((layer, "bad")))
        copy.add(layer, "good", lambda layer=layer: ran.append((layer, "good")))
    copy.start(pool)
    assert copy.join(timeout_s=10)
    assert ran == [(0, "good"), (1, "good"), (2, "good")]
    assert set(copy.errors) == {"bad"} and "another layout" in str(copy.errors["bad"])


def test_nothing_queued_is_empty_and_never_waits() -> None:
    copy = LayeredCopy(30)
    assert not copy
    assert copy.wait(29, timeout_s=0) and copy.join(timeout_s=0)
    copy.add(5, "a", lambda: None)
    assert copy


def test_copies_are_queued_before_the_copying_starts(pool: ThreadPoolExecutor) -> None:
    copy = LayeredCopy(1)
    copy.add(0, "a", lambda: None)
    copy.start(pool)
    with pytest.raises(RuntimeError, match="before the copying starts"):
        copy.add(0, "a", lambda: None)
    assert copy.join(timeout_s=10)
