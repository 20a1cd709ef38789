from __future__ import annotations

from controller.registry import InstanceRegistry
from controller.request_log import RequestLog
from protocol.ids import InstanceId, RequestId
from protocol.lifecycle import RequestState
from protocol.snapshots import InstanceSnapshot, InstanceState, RequestEvent, Role


def snap(iid: str, running: int = 0) -> InstanceSnapshot:
    return InstanceSnapshot(
        InstanceId(iid), Role.DECODE, InstanceState.READY, f"pdflow-{iid}", num_running=running
    )


def test_a_silent_worker_is_marked_dead_and_comes_back_when_it_reports() -> None:
    reg = InstanceRegistry(heartbeat_timeout_s=3.0)
    reg.report(snap("decode-0"), now=100.0)
    reg.report(snap("decode-1"), now=100.0)
    assert reg.expire(now=102.0) == []
    reg.report(snap("decode-1", running=2), now=102.5)
    assert reg.expire(now=103.5) == ["decode-0"]
    states = {i.instance_id: i.state for i in reg.snapshot(now=103.5).instances}
    assert states == {"decode-0": InstanceState.DEAD, "decode-1": InstanceState.READY}
    assert reg.expire(now=104.0) == []  # reported once
    reg.report(snap("decode-0"), now=105.0)
    assert reg.snapshot(now=105.0).by_id("decode-0").state is InstanceState.READY  # type: ignore[union-attr]


def test_a_starting_worker_has_its_engine_s_start_deadline_to_report_again() -> None:
    """Loading an engine may starve a worker's reports for longer than a heartbeat timeout; it was marked
    DEAD, and the controller removed (killed) it while it started."""
    from dataclasses import replace

    reg = InstanceRegistry(heartbeat_timeout_s=3.0, start_timeout_s=60.0)
    reg.report(replace(snap("decode-0"), state=InstanceState.STARTING), now=100.0)
    reg.report(snap("decode-1"), now=100.0)
    assert reg.expire(now=130.0) == ["decode-1"]
    reg.report(snap("decode-0"), now=131.0)  # started: the heartbeat timeout again
    assert reg.expire(now=135.0) == ["decode-0"]


def test_snapshot_versions_grow_with_every_change() -> None:
    reg = InstanceRegistry(heartbeat_timeout_s=1.0)
    v0 = reg.snapshot(0.0).version
    reg.report(snap("decode-0"), now=0.0)
    v1 = reg.snapshot(0.0).version
    reg.expire(now=5.0)
    assert v0 < v1 < reg.snapshot(5.0).version


def test_request_log_keeps_history_and_bounds_finished_records() -> None:
    log = RequestLog(history=10)
    for n in range(15):
        rid = RequestId(f"r{n}")
        log.apply(RequestEvent(rid, RequestState.QUEUED, at=n), prompt_tokens=5)
        log.apply(RequestEvent(rid, RequestState.PREFILLING, at=n + 0.1))
        if n < 12:
            log.apply(RequestEvent(rid, RequestState.FINISHED_STOP, at=n + 0.2), output_tokens=3)
    assert len(log.list(limit=0)) == 10
    active = log.list("active")
    assert [r.request_id for r in active] == ["r12", "r13", "r14"]
    r11 = log.get("r11")
    assert r11 is not None and [e.state for e in r11.events] == [
        RequestState.QUEUED,
        RequestState.PREFILLING,
        RequestState.FINISHED_STOP,
    ]
    assert r11.prompt_tokens == 5 and r11.output_tokens == 3
    assert log.counts() == {"FINISHED_STOP": 7, "PREFILLING": 3}


def test_a_new_start_under_a_drained_instances_id_takes_requests() -> None:
    """A StatefulSet's replacement pod keeps the name of the one its preStop drain cordoned: the new run
    serves; the same run coming back after a silence stays cordoned."""
    from dataclasses import replace

    reg = InstanceRegistry(heartbeat_timeout_s=3.0)
    first = replace(snap("decode-0"), started_at=100.0)
    reg.report(first, now=100.0)
    reg.cordon("decode-0")
    reg.report(replace(first, state=InstanceState.DEAD), now=101.0)  # SIGTERM after the drain
    reg.report(replace(first, started_at=200.0), now=200.0)  # the replacement pod, same name
    assert reg.snapshot(200.0).by_id("decode-0").state is InstanceState.READY  # type: ignore[union-attr]

    reg.cordon("decode-0")
    reg.expire(now=210.0)  # silent: marked DEAD
    reg.report(replace(first, started_at=200.0), now=211.0)  # the same run, heard again
    assert reg.snapshot(211.0).by_id("decode-0").state is InstanceState.CORDONED  # type: ignore[union-attr]


def test_request_log_drops_requests_a_dead_front_door_left_unfinished() -> None:
    """They used to stay "active" for good: 10,000 of them and the controller's log grew without bound."""
    now = [10_000.0]
    log = RequestLog(history=10, stale_s=3600, wall_clock=lambda: now[0])
    for n in range(8):  # a front door died with these in flight
        log.apply(RequestEvent(RequestId(f"ghost{n}"), RequestState.DECODING, at=now[0]))
    now[0] += 3601
    log.apply(RequestEvent(RequestId("live"), RequestState.DECODING, at=now[0]))  # running, recent
    for n in range(30):
        rid = RequestId(f"r{n}")
        log.apply(RequestEvent(rid, RequestState.QUEUED, at=now[0]))
        log.apply(RequestEvent(rid, RequestState.FINISHED_STOP, at=now[0]))
    assert len(log.list(limit=0)) == 10
    assert [r.request_id for r in log.list("active")] == ["live"]
