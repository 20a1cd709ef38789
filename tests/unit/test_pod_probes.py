"""A worker pod's probes (``pdctl pod worker``): what the kubelet is told in each state of the worker, over
real HTTP, with the worker's answers (``EngineWorker.health``) scripted."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdctl.pod import ProbeServer

READY = {"state": "READY", "engine_alive": True, "reported_s_ago": 0.2}


class Worker:
    def __init__(self) -> None:
        self.answer: dict[str, Any] | Exception = READY

    def health(self) -> dict[str, Any]:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Worker, str]]:
    monkeypatch.setenv("PDFLOW_PROBE_HOST", "127.0.0.1")
    worker = Worker()
    server = ProbeServer(0, worker.health, heartbeat_timeout_s=3.0)
    server.start()
    yield worker, f"http://127.0.0.1:{server.port}"
    server.stop()


def codes(url: str) -> tuple[int, int]:
    return httpx.get(f"{url}/livez").status_code, httpx.get(f"{url}/readyz").status_code


def test_a_registered_worker_is_live_and_ready(probes: tuple[Worker, str]) -> None:
    _, url = probes
    assert codes(url) == (200, 200)
    assert httpx.get(f"{url}/readyz").json()["state"] == "READY"


def test_a_starting_worker_is_live_but_not_ready(probes: tuple[Worker, str]) -> None:
    worker, url = probes
    worker.answer = {"state": "STARTING", "engine_alive": True, "reported_s_ago": None}
    assert codes(url) == (200, 503)


def test_a_worker_the_controller_stopped_hearing_is_not_ready(probes: tuple[Worker, str]) -> None:
    worker, url = probes
    worker.answer = READY | {"reported_s_ago": 9.0}
    assert codes(url) == (200, 503)
    assert "not registered" in httpx.get(f"{url}/readyz").json()["error"]


def test_a_dead_engine_fails_both_probes(probes: tuple[Worker, str]) -> None:
    worker, url = probes
    worker.answer = READY | {"engine_alive": False}
    assert codes(url) == (503, 503)


def test_a_worker_that_does_not_answer_fails_both_probes(probes: tuple[Worker, str]) -> None:
    worker, url = probes
    worker.answer = TimeoutError("no answer within 2 s")
    assert codes(url) == (503, 503)
    assert "does not answer" in httpx.get(f"{url}/livez").json()["error"]


def test_an_unknown_path_is_a_404(probes: tuple[Worker, str]) -> None:
    _, url = probes
    assert httpx.get(f"{url}/healthz").status_code == 404
