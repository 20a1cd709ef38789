"""The Kubernetes actuator through the real ``kubernetes`` client and a kubeconfig, against the fake API
server (``tests/support/fake_kube.py``): what an operator would see on a cluster. The fake's ReplicaSet
deletes pods in Kubernetes' order, so a scale-in that does not steer it takes the wrong pod (a test shows it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autoscaler.kube_api import DECISION, DELETION_COST, PREVIOUS, REPLICAS, PoolWorkload
from autoscaler.kubernetes import KubernetesActuator
from protocol.actuation import Outcome
from protocol.snapshots import Role
from tests.support.fake_kube import FakeKube

NS = "pdflow"


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    fake = FakeKube(NS)
    yield fake
    fake.close()


def _actuator(kube: FakeKube, tmp_path: Path, kind: str = "Deployment", **kw: Any) -> KubernetesActuator:
    workloads = {
        Role.DECODE: PoolWorkload(kind, "decode", NS),
        Role.PREFILL: PoolWorkload(kind, "prefill", NS),
    }
    return KubernetesActuator.from_kubeconfig(kube.kubeconfig(tmp_path / "kubeconfig"), workloads, **kw)


def _annotations(kube: FakeKube, name: str) -> dict[str, str]:
    pod = next(p for p in kube.pods("decode") if p["metadata"]["name"] == name)
    return dict(pod["metadata"]["annotations"])


def test_scale_out_raises_replicas_once_per_decision(kube: FakeKube, tmp_path: Path) -> None:
    kube.add_workload("Deployment", "decode", 1)
    kube.add_workload("Deployment", "prefill", 1)
    actuator = _actuator(kube, tmp_path)

    first = actuator.scale("d-1", Role.DECODE, 3)
    again = actuator.scale("d-1", Role.DECODE, 3)

    assert first.outcome is Outcome.APPLIED and (first.replicas_before, first.replicas_after) == (1, 3)
    assert again.outcome is Outcome.UNCHANGED
    assert kube.replicas("Deployment", "decode") == 3 and len(kube.pod_names("decode")) == 3
    assert kube.replicas("Deployment", "prefill") == 1
    status = actuator.status(Role.DECODE)
    assert (status.set_by_pdflow, status.decision_id) == (3, "d-1")
    assert len(status.pending) == 2  # the new pods wait for a node


def test_scale_in_removes_exactly_the_drained_victim(kube: FakeKube, tmp_path: Path) -> None:
    kube.add_workload("Deployment", "decode", 3)
    kube.add_workload("Deployment", "prefill", 1)
    # The ReplicaSet alone would delete the newest pod: drain the oldest to see the annotation win.
    victim = min(kube.pods("decode"), key=lambda p: int(p["metadata"]["resourceVersion"]))["metadata"]["name"]
    actuator = _actuator(kube, tmp_path)
    actuator.scale("d-0", Role.DECODE, 3)  # adopt the workload as pdflow's

    done = actuator.scale("d-2", Role.DECODE, 2, victims=(victim,))

    assert done.outcome is Outcome.APPLIED, done.detail
    assert done.removed == (victim,)
    assert victim not in kube.pod_names("decode") and len(kube.pod_names("decode")) == 2
    assert actuator.scale("d-2", Role.DECODE, 2, victims=(victim,)).outcome is Outcome.UNCHANGED


def test_without_the_deletion_cost_the_replicaset_takes_another_pod(kube: FakeKube, tmp_path: Path) -> None:
    """The control case: lowering the replicas alone removes a pod the autoscaler did not drain, and the
    actuator's watch catches it (FAILED, naming the pod removed)."""
    kube.add_workload("Deployment", "decode", 3)
    kube.add_workload("Deployment", "prefill", 1)
    victim = min(kube.pods("decode"), key=lambda p: int(p["metadata"]["resourceVersion"]))["metadata"]["name"]
    actuator = _actuator(kube, tmp_path, deadline_s=2.0)
    actuator.scale("d-0", Role.DECODE, 3)
    actuator._calls.mark_victim = lambda workload, pod_name: None  # type: ignore[method-assign]

    done = actuator.scale("d-2", Role.DECODE, 2, victims=(victim,))

    assert done.outcome is Outcome.FAILED
    assert done.removed and victim not in done.removed
    assert victim in kube.pod_names("decode")


def test_no_scale_in_while_a_pod_is_pending_or_not_ready(kube: FakeKube, tmp_path: Path) -> None:
    kube.add_workload("Deployment", "decode", 2)
    kube.add_workload("Deployment", "prefill", 1)
    actuator = _actuator(kube, tmp_path)
    victim = kube.pod_names("decode")[0]
    actuator.scale("up", Role.DECODE, 3)
    new = new_pod(kube)

    held = actuator.scale("down", Role.DECODE, 2, victims=(victim,))
    assert held.outcome is Outcome.PENDING and new in held.detail
    assert kube.replicas("Deployment", "decode") == 3 and victim in kube.pod_names("decode")

    kube.ready(new, ready=False)  # scheduled, not ready yet: the ReplicaSet would still take it first
    assert actuator.scale("down", Role.DECODE, 2, victims=(victim,)).outcome is Outcome.PENDING

    kube.ready(new)
    done = actuator.scale("down", Role.DECODE, 2, victims=(victim,))
    assert done.outcome is Outcome.APPLIED and done.removed == (victim,)
    assert new in kube.pod_names("decode")


def test_cancel_removes_only_pending_pods(kube: FakeKube, tmp_path: Path) -> None:
    kube.add_workload("Deployment", "decode", 2)
    kube.add_workload("Deployment", "prefill", 1)
    actuator = _actuator(kube, tmp_path)
    serving = kube.pod_names("decode")
    actuator.scale("up", Role.DECODE, 3)
    pending = new_pod(kube)

    refused = actuator.scale("cancel", Role.DECODE, 2, cancel=(serving[0],))
    assert refused.outcome is Outcome.REFUSED and kube.replicas("Deployment", "decode") == 3

    done = actuator.scale("cancel", Role.DECODE, 2, cancel=(pending,))
    assert done.outcome is Outcome.APPLIED and done.removed == (pending,)
    assert kube.pod_names("decode") == serving


def test_statefulset_removes_only_its_highest_ordinal(kube: FakeKube, tmp_path: Path) -> None:
    kube.add_workload("StatefulSet", "decode", 3)
    kube.add_workload("StatefulSet", "prefill", 1)
    actuator = _actuator(kube, tmp_path, kind="StatefulSet")
    actuator.scale("d-0", Role.DECODE, 3)

    assert actuator.victim_order(Role.DECODE, ["decode-0", "decode-2", "decode-1"]) == ["decode-2"]
    refused = actuator.scale("d-1", Role.DECODE, 2, victims=("decode-0",))
    assert refused.outcome is Outcome.REFUSED and "highest ordinals" in refused.detail
    assert kube.pod_names("decode") == ["decode-0", "decode-1", "decode-2"]

    done = actuator.scale("d-2", Role.DECODE, 2, victims=("decode-2",))
    assert done.outcome is Outcome.APPLIED and done.removed == ("decode-2",)
    assert kube.pod_names("decode") == ["decode-0", "decode-1"]
    assert all(DELETION_COST not in _annotations(kube, n) for n in kube.pod_names("decode"))


def test_a_manual_scale_holds_the_pool_until_resumed(kube: FakeKube, tmp_path: Path) -> None:
    kube.add_workload("Deployment", "decode", 2)
    kube.add_workload("Deployment", "prefill", 1)
    actuator = _actuator(kube, tmp_path)
    actuator.scale("d-1", Role.DECODE, 2)
    kube.edit_replicas("Deployment", "decode", 4)  # kubectl scale --replicas=4

    held = actuator.scale("d-2", Role.DECODE, 3)
    assert held.outcome is Outcome.MANUAL_OVERRIDE and "pdflow set 2" in held.detail
    assert kube.replicas("Deployment", "decode") == 4
    assert actuator.status(Role.DECODE).manual_override

    assert actuator.members(Role.DECODE).hold.startswith("manual_override")
    members = actuator.resume(Role.DECODE)
    assert not members.hold and members.replicas == 4
    assert actuator.status(Role.DECODE).set_by_pdflow == 4
    assert actuator.scale("d-3", Role.DECODE, 5).outcome is Outcome.APPLIED
    assert kube.replicas("Deployment", "decode") == 5


def test_a_conflicting_write_is_read_again_and_retried(kube: FakeKube, tmp_path: Path) -> None:
    kube.add_workload("Deployment", "decode", 1)
    kube.add_workload("Deployment", "prefill", 1)
    actuator = _actuator(kube, tmp_path)
    kube.conflicts_to_inject = 2

    done = actuator.scale("d-1", Role.DECODE, 2)

    assert done.outcome is Outcome.APPLIED and kube.replicas("Deployment", "decode") == 2
    assert kube.conflicts_to_inject == 0
    assert sum(1 for method, path in kube.requests if method == "PUT" and path.endswith("/scale")) == 3


def test_conflicts_past_the_retries_surface(kube: FakeKube, tmp_path: Path) -> None:
    from kubernetes.client.exceptions import ApiException

    kube.add_workload("Deployment", "decode", 1)
    kube.add_workload("Deployment", "prefill", 1)
    actuator = _actuator(kube, tmp_path, conflict_retries=1)
    kube.conflicts_to_inject = 5

    with pytest.raises(ApiException) as raised:
        actuator.scale("d-1", Role.DECODE, 2)
    assert raised.value.status == 409
    assert kube.replicas("Deployment", "decode") == 1


def test_the_decision_and_replicas_are_recorded_on_the_workload(kube: FakeKube, tmp_path: Path) -> None:
    kube.add_workload("Deployment", "decode", 1)
    kube.add_workload("Deployment", "prefill", 1)
    actuator = _actuator(kube, tmp_path)
    actuator.scale("scale-out-7", Role.PREFILL, 2)
    obj = actuator._calls.get(actuator.workloads[Role.PREFILL])
    annotations = obj.metadata.annotations
    assert (annotations[REPLICAS], annotations[PREVIOUS], annotations[DECISION]) == ("2", "1", "scale-out-7")


def new_pod(kube: FakeKube) -> str:
    """The decode pod created last (the one still Pending after a scale-out)."""
    pending = [p["metadata"]["name"] for p in kube.pods("decode") if p["status"]["phase"] == "Pending"]
    assert len(pending) == 1, pending
    return pending[0]


def test_a_victim_counts_as_removed_once_its_graceful_deletion_starts(kube: FakeKube, tmp_path: Path) -> None:
    """A real pod ends gracefully (its preStop hook drains it): it is Terminating long before it is gone.
    The actuator sees the deletion start, and the pod is no longer a member."""
    kube.add_workload("Deployment", "decode", 3)
    kube.add_workload("Deployment", "prefill", 1)
    kube.termination_grace_s = 30.0
    victim = kube.pod_names("decode")[1]
    actuator = _actuator(kube, tmp_path, deadline_s=10.0)
    actuator.scale("d-0", Role.DECODE, 3)

    done = actuator.scale("d-1", Role.DECODE, 2, victims=(victim,))

    assert done.outcome is Outcome.APPLIED and done.removed == (victim,), done.detail
    assert kube.terminating("decode") == [victim]
    members = actuator.members(Role.DECODE)
    assert victim not in members.instances and members.replicas == 2


def test_a_scale_write_that_failed_is_not_taken_for_a_manual_override(kube: FakeKube, tmp_path: Path) -> None:
    from kubernetes.client.exceptions import ApiException

    kube.add_workload("Deployment", "decode", 1)
    kube.add_workload("Deployment", "prefill", 1)
    actuator = _actuator(kube, tmp_path)
    kube.failures_to_inject = 1  # the API server fails the /scale write after pdflow recorded it

    with pytest.raises(ApiException):
        actuator.scale("d-1", Role.DECODE, 2)
    status = actuator.status(Role.DECODE)
    assert status.write_lost and not status.manual_override and not actuator.members(Role.DECODE).hold

    again = actuator.scale("d-1", Role.DECODE, 2)  # the same decision, sent again
    assert again.outcome is Outcome.APPLIED and kube.replicas("Deployment", "decode") == 2
    assert actuator.scale("d-1", Role.DECODE, 2).outcome is Outcome.UNCHANGED


def test_cancelling_a_starting_pod_needs_the_pods_the_replicaset_takes_first(
    kube: FakeKube, tmp_path: Path
) -> None:
    kube.add_workload("Deployment", "decode", 1)
    kube.add_workload("Deployment", "prefill", 1)
    actuator = _actuator(kube, tmp_path)
    actuator.scale("up", Role.DECODE, 3)
    starting, unscheduled = [p for p in kube.pod_names("decode") if p in _pending_names(kube)]
    kube.ready(starting, ready=False)  # scheduled, its engine still starting

    refused = actuator.scale("cancel-1", Role.DECODE, 2, cancel=(starting,))
    assert refused.outcome is Outcome.REFUSED and unscheduled in refused.detail

    done = actuator.scale("cancel-2", Role.DECODE, 1, cancel=(starting, unscheduled))
    assert done.outcome is Outcome.APPLIED and set(done.removed) == {starting, unscheduled}
    assert len(kube.pod_names("decode")) == 1


def test_a_victim_that_is_not_ready_itself_can_still_go(kube: FakeKube, tmp_path: Path) -> None:
    """The guard is against other pods the ReplicaSet would take first, not the victim (a dead worker)."""
    kube.add_workload("Deployment", "decode", 2)
    kube.add_workload("Deployment", "prefill", 1)
    actuator = _actuator(kube, tmp_path)
    actuator.scale("d-0", Role.DECODE, 2)
    victim = kube.pod_names("decode")[0]
    kube.ready(victim, ready=False)

    done = actuator.scale("d-1", Role.DECODE, 1, victims=(victim,))
    assert done.outcome is Outcome.APPLIED and done.removed == (victim,)


def _pending_names(kube: FakeKube) -> set[str]:
    return {p["metadata"]["name"] for p in kube.pods("decode") if p["status"]["phase"] == "Pending"}


def test_from_config_names_the_charts_workloads_and_travels_to_the_controller(
    kube: FakeKube, tmp_path: Path
) -> None:
    """The head builds the actuator from the config the chart writes and hands it to the controller actor
    (pickled): the copy talks to the same API server and acts on the same workloads."""
    import pickle

    from protocol.config import ClusterConfig

    kube.add_workload("Deployment", "decode", 1)
    kube.add_workload("Deployment", "prefill", 1)
    config = kube.kubeconfig(tmp_path / "kubeconfig")
    cfg = ClusterConfig.load(
        overrides={
            "kubernetes.pools": "kubernetes",
            "kubernetes.namespace": NS,
            "kubernetes.prefill_workload": "prefill",
            "kubernetes.decode_workload": "decode",
            "kubernetes.kubeconfig": str(config),
        }
    )
    moved = pickle.loads(pickle.dumps(KubernetesActuator.from_config(cfg)))

    assert moved.scale("d-1", Role.DECODE, 2).outcome is Outcome.APPLIED
    assert kube.replicas("Deployment", "decode") == 2 and kube.replicas("Deployment", "prefill") == 1
    assert moved.members(Role.DECODE).replicas == 2
