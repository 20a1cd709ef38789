"""A vLLM general plugin (entry point ``vllm.general_plugins``, which vLLM loads in each of its processes):
engine processes that wait for their shared-memory queue instead of spinning on it.

vLLM's engine core and its worker process talk through a shared-memory ring (``shm_broadcast.MessageQueue``).
A reader busy-waits on it, one ``sched_yield`` after another, for a second after its last read, and only
then parks on the ring's ZeroMQ notification. On a GPU host that costs a spare core. On CPU the engine core
spins the whole time its worker computes a step, on the cores the step runs on: with two engines on two
cores, each engine core took 30-700 ms of CPU a second.

With ``PDFLOW_ENGINE_WAIT_MS`` set, a reader parks on the notification at once, and looks at the ring again
every that many milliseconds anyway, in case a notification is lost (vLLM's own parked reader looks every 5 s;
none was lost in 700 messages here). Unset, vLLM's wait stays. The engine host sets it from
``engine.queue_wait_ms``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import zmq

ENV = "PDFLOW_ENGINE_WAIT_MS"
DEFAULT_MS = {"cpu": 10.0}  # engine.queue_wait_ms when unset, by device (elsewhere: vLLM's own wait)

log = logging.getLogger(__name__)


def parking_wait(recheck_ms: float) -> Callable[..., None]:
    """A ``SpinCondition.wait`` that parks: it returns on a notification (or a cancel), or after
    ``recheck_ms`` (or the caller's shorter ``timeout_ms``); the caller then looks at the ring itself."""
    if not recheck_ms > 0:
        raise ValueError(f"the queue's recheck interval must be a positive number of ms, got {recheck_ms}")

    def wait(self: Any, timeout_ms: int | None = None) -> None:
        limit = recheck_ms if timeout_ms is None else min(recheck_ms, timeout_ms)
        events = dict(self.poller.poll(timeout=limit))
        if self.local_notify_socket in events:
            # the socket keeps one notification at most (zmq.CONFLATE): reading it lets the next one wake us
            self.local_notify_socket.recv(flags=zmq.NOBLOCK, copy=False)

    return wait


def export(queue_wait_ms: float | None, device: str) -> None:
    """Set (or clear) ``PDFLOW_ENGINE_WAIT_MS`` in this process's environment, which the vLLM processes it
    starts next inherit, from ``engine.queue_wait_ms`` (None: the device's default; 0: vLLM's own wait)."""
    if queue_wait_ms is None:
        queue_wait_ms = DEFAULT_MS.get(device, 0.0)
    if queue_wait_ms:
        os.environ[ENV] = f"{queue_wait_ms:g}"
    else:
        os.environ.pop(ENV, None)


def register() -> None:
    """Swap the parking wait into vLLM if ``PDFLOW_ENGINE_WAIT_MS`` asks for it."""
    value = os.environ.get(ENV, "")
    if not value:
        return
    try:
        wait = parking_wait(float(value))
    except ValueError as exc:
        raise ValueError(f"{ENV}={value!r}: {exc}") from None
    from vllm.distributed.device_communicators import shm_broadcast

    condition = getattr(shm_broadcast, "SpinCondition", None)
    if condition is None or not callable(getattr(condition, "wait", None)):
        log.warning("%s: no shm_broadcast.SpinCondition in this vLLM; its queues keep their own wait", ENV)
        return
    condition.wait = wait
    log.debug("vLLM's queue readers park (recheck every %s ms)", value)
