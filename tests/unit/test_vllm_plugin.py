"""The parking wait that replaces vLLM's spinning queue reader (``engine.vllm_plugin``), on real
ZeroMQ sockets set up as vLLM's ``SpinCondition`` sets up its reader and writer."""

from __future__ import annotations

import os
import sys
import threading
import time
import types
import uuid
from collections.abc import Iterator

import pytest
import zmq

from engine import vllm_plugin


@pytest.fixture
def condition() -> Iterator[tuple[types.SimpleNamespace, zmq.Socket]]:
    """A reader (poller over its notify socket) and the writer's notify socket, as in vLLM."""
    context = zmq.Context()
    address = f"inproc://notify-{uuid.uuid4().hex}"
    writer = context.socket(zmq.PUB)
    writer.setsockopt(zmq.SNDHWM, 1)
    writer.bind(address)
    notify = context.socket(zmq.SUB)
    notify.setsockopt(zmq.CONFLATE, 1)
    notify.setsockopt_string(zmq.SUBSCRIBE, "")
    notify.connect(address)
    poller = zmq.Poller()
    poller.register(notify, zmq.POLLIN)
    # a subscription reaches the writer asynchronously: notify until one arrives, then start with none pending
    deadline = time.monotonic() + 10
    while not notify.poll(timeout=20):
        assert time.monotonic() < deadline, "the reader never subscribed"
        writer.send(b"\x00")
    while notify.poll(timeout=50):  # one still on its way, if any
        notify.recv()
    try:
        yield types.SimpleNamespace(poller=poller, local_notify_socket=notify), writer
    finally:
        writer.close(0)
        notify.close(0)
        context.term()


def _timed_wait(reader: types.SimpleNamespace, wait: object, **kwargs: int) -> tuple[float, float]:
    """Wall and CPU seconds of one wait on this thread."""
    wall, cpu = time.monotonic(), time.thread_time()
    wait(reader, **kwargs)  # type: ignore[operator]
    return time.monotonic() - wall, time.thread_time() - cpu


def test_a_notification_wakes_the_reader_at_once(condition: tuple[types.SimpleNamespace, zmq.Socket]) -> None:
    reader, writer = condition
    wait = vllm_plugin.parking_wait(10_000)
    threading.Timer(0.1, lambda: writer.send(b"\x00")).start()
    wall, _ = _timed_wait(reader, wait)
    assert 0.05 < wall < 5


def test_a_parked_reader_uses_no_cpu_and_looks_again_when_a_notification_is_lost(
    condition: tuple[types.SimpleNamespace, zmq.Socket],
) -> None:
    reader, _ = condition
    wall, cpu = _timed_wait(reader, vllm_plugin.parking_wait(300))
    assert 0.25 < wall < 5
    assert cpu < 0.1 * wall  # vLLM's reader would have spun the whole time


def test_the_callers_shorter_timeout_wins(condition: tuple[types.SimpleNamespace, zmq.Socket]) -> None:
    reader, _ = condition
    wall, _ = _timed_wait(reader, vllm_plugin.parking_wait(10_000), timeout_ms=100)
    assert 0.05 < wall < 5


def test_a_read_notification_is_consumed(condition: tuple[types.SimpleNamespace, zmq.Socket]) -> None:
    """The notification of a write the reader already took must not end its next wait early."""
    reader, writer = condition
    wait = vllm_plugin.parking_wait(300)
    writer.send(b"\x00")
    first, _ = _timed_wait(reader, wait)
    second, _ = _timed_wait(reader, wait)
    assert first < 0.25
    assert second > 0.25


@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon"])
def test_a_bad_interval_is_refused_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(vllm_plugin.ENV, value)
    with pytest.raises(ValueError, match=vllm_plugin.ENV):
        vllm_plugin.register()


@pytest.fixture
def shm_broadcast(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A stand-in for vLLM's ``shm_broadcast`` module (unit tests do not import vLLM)."""
    module = types.ModuleType("shm_broadcast")

    class SpinCondition:
        def wait(self, timeout_ms: int | None = None) -> None:
            raise AssertionError("spins")

    module.SpinCondition = SpinCondition  # type: ignore[attr-defined]
    package = types.ModuleType("device_communicators")
    package.shm_broadcast = module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm.distributed.device_communicators", package)
    monkeypatch.setitem(sys.modules, "vllm.distributed.device_communicators.shm_broadcast", module)
    return module


def test_set_swaps_the_parking_wait_in(
    monkeypatch: pytest.MonkeyPatch, shm_broadcast: types.ModuleType
) -> None:
    monkeypatch.setenv(vllm_plugin.ENV, "2")
    spinning = shm_broadcast.SpinCondition.wait
    vllm_plugin.register()
    assert shm_broadcast.SpinCondition.wait is not spinning
    assert shm_broadcast.SpinCondition.wait.__qualname__.startswith("parking_wait")


def test_unset_leaves_vllms_wait(monkeypatch: pytest.MonkeyPatch, shm_broadcast: types.ModuleType) -> None:
    monkeypatch.delenv(vllm_plugin.ENV, raising=False)
    spinning = shm_broadcast.SpinCondition.wait
    vllm_plugin.register()
    assert shm_broadcast.SpinCondition.wait is spinning


def test_a_vllm_without_the_spin_condition_keeps_its_wait(
    monkeypatch: pytest.MonkeyPatch, shm_broadcast: types.ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(vllm_plugin.ENV, "10")
    monkeypatch.delattr(shm_broadcast, "SpinCondition")
    vllm_plugin.register()  # the engine still starts
    assert "keep their own wait" in caplog.text


@pytest.mark.parametrize(
    ("configured", "device", "exported"),
    [(None, "cpu", "10"), (None, "cuda", None), (0, "cpu", None), (2.5, "cuda", "2.5"), (1, "cpu", "1")],
)
def test_the_engine_config_reaches_vllms_processes(
    monkeypatch: pytest.MonkeyPatch, configured: float | None, device: str, exported: str | None
) -> None:
    """Parked on CPU by default, vLLM's own wait on GPU; 0 turns it off, any other value is the interval."""
    monkeypatch.setenv(vllm_plugin.ENV, "7")
    vllm_plugin.export(configured, device)
    assert os.environ.get(vllm_plugin.ENV) == exported
