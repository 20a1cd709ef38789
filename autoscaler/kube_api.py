"""The Kubernetes calls the actuator makes on one pool's workload (a Deployment or a StatefulSet) and its
pods, each with a deadline, and what it reads back: the pods as the actuator needs to see them, and the
replicas with pdflow's record of what it set."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
VICTIM_COST = "-2147483648"  # the lowest an int32 cost can be: deleted before every other pod of its class
REPLICAS = "pdflow.io/replicas"  # the replicas pdflow set last
PREVIOUS = "pdflow.io/replicas-before"  # the replicas before that (a write that did not land leaves these)
DECISION = "pdflow.io/decision-id"  # the decision that set them
MERGE = "application/merge-patch+json"


@dataclass(frozen=True, slots=True)
class PoolWorkload:
    """The Deployment or StatefulSet that runs one pool's instances (one worker per pod)."""

    kind: str  # "Deployment" or "StatefulSet"
    name: str
    namespace: str


@dataclass(frozen=True, slots=True)
class PodView:
    name: str
    phase: str
    scheduled: bool
    ready: bool

    @property
    def pending(self) -> bool:
        return not self.scheduled or self.phase == "Pending"

    @property
    def deletion_class(self) -> tuple[bool, bool, bool]:
        """A ReplicaSet deletes the lower class first (unscheduled, then Pending, then not ready, then the
        rest); the deletion cost orders pods within a class."""
        return (self.scheduled, self.phase != "Pending", self.ready)


@dataclass(frozen=True, slots=True)
class PoolStatus:
    replicas: int
    set_by_pdflow: int | None  # the replicas pdflow set last (None: never)
    previous: int | None  # the replicas before pdflow's last write
    decision_id: str
    pods: tuple[PodView, ...]  # live pods; those being deleted (Terminating) are left out
    terminating: tuple[str, ...] = ()

    @property
    def write_lost(self) -> bool:
        """pdflow recorded a write of the replicas that did not land (the replicas are still the old ones)."""
        return self.set_by_pdflow not in (None, self.replicas) and self.previous == self.replicas

    @property
    def manual_override(self) -> bool:
        """Someone else changed the replicas since pdflow set them."""
        return self.set_by_pdflow not in (None, self.replicas) and not self.write_lost

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.pods if p.pending)

    @property
    def not_ready(self) -> tuple[str, ...]:
        """Pods a ReplicaSet deletes before it looks at deletion costs: Pending ones and not-ready ones."""
        return tuple(p.name for p in self.pods if p.pending or not p.ready)


class WorkloadApi:
    """One pool's workload and pods through the real client; every call carries ``deadline_s``."""

    def __init__(self, api: Any, deadline_s: float, conflict_retries: int) -> None:
        self._apps: Any = client.AppsV1Api(api)
        self._core: Any = client.CoreV1Api(api)
        self.deadline_s = deadline_s
        self.conflict_retries = conflict_retries

    def status(self, workload: PoolWorkload) -> PoolStatus:
        obj = self.get(workload)
        annotations = obj.metadata.annotations or {}
        views = self._list(workload, obj).items
        return PoolStatus(
            int(obj.spec.replicas or 0),
            _int(annotations.get(REPLICAS)),
            _int(annotations.get(PREVIOUS)),
            annotations.get(DECISION, ""),
            tuple(_view(p) for p in views if p.metadata.deletion_timestamp is None),
            tuple(p.metadata.name for p in views if p.metadata.deletion_timestamp is not None),
        )

    def get(self, workload: PoolWorkload) -> Any:
        read = (
            self._apps.read_namespaced_deployment
            if workload.kind == "Deployment"
            else self._apps.read_namespaced_stateful_set
        )
        return read(workload.name, workload.namespace, _request_timeout=self.deadline_s)

    def pods_version(self, workload: PoolWorkload) -> str:
        return str(self._list(workload, self.get(workload)).metadata.resource_version)

    def annotate(self, workload: PoolWorkload, annotations: Callable[[Any], dict[str, str]]) -> None:
        """Merge ``annotations(workload object)`` into the workload's, carrying the resourceVersion read;
        a 409 reads it again and retries."""
        self._retrying(workload, lambda: self._annotate(workload, self.get(workload), annotations))

    def set_replicas(self, workload: PoolWorkload, decision_id: str, replicas: int) -> None:
        """Record the write (replicas, the replicas before, the decision), then set the replicas through
        ``/scale``, both carrying the resourceVersions read; a 409 reads them again and retries. A write that
        fails after the record leaves ``write_lost`` readable, not a manual override."""
        deployment = workload.kind == "Deployment"
        read_scale = (
            self._apps.read_namespaced_deployment_scale
            if deployment
            else self._apps.read_namespaced_stateful_set_scale
        )
        replace_scale = (
            self._apps.replace_namespaced_deployment_scale
            if deployment
            else self._apps.replace_namespaced_stateful_set_scale
        )

        def attempt() -> None:
            obj = self.get(workload)
            before = int(obj.spec.replicas or 0)
            record = {PREVIOUS: str(before), REPLICAS: str(replicas), DECISION: decision_id}
            self._annotate(workload, obj, lambda _: record)
            scale = read_scale(workload.name, workload.namespace, _request_timeout=self.deadline_s)
            if int(scale.spec.replicas or 0) != before:  # someone scaled it between the two reads
                raise ApiException(status=409, reason="Conflict")
            scale.spec.replicas = replicas
            replace_scale(workload.name, workload.namespace, scale, _request_timeout=self.deadline_s)

        self._retrying(workload, attempt)

    def mark_victim(self, workload: PoolWorkload, pod_name: str) -> None:
        """The lowest deletion cost on the pod, read back until it shows: the ReplicaSet must see it."""
        patch = {"metadata": {"annotations": {DELETION_COST: VICTIM_COST}}}
        self._core.patch_namespaced_pod(
            pod_name, workload.namespace, patch, _content_type=MERGE, _request_timeout=self.deadline_s
        )
        deadline = time.monotonic() + self.deadline_s
        while True:
            pod = self._core.read_namespaced_pod(
                pod_name, workload.namespace, _request_timeout=self.deadline_s
            )
            if (pod.metadata.annotations or {}).get(DELETION_COST) == VICTIM_COST:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the deletion cost of {pod_name} did not show within {self.deadline_s:g} s"
                )
            time.sleep(0.05)

    def wait_removed(self, workload: PoolWorkload, leaving: set[str], resource_version: str) -> list[str]:
        """Watch the workload's pods from ``resource_version`` until every pod in ``leaving`` is being
        deleted (its deletionTimestamp set: a pod's graceful end may take long) or gone, or the deadline
        passes; every pod removed meanwhile, in order."""
        obj = self.get(workload)
        removed: list[str] = []
        stream = watch.Watch()
        for event in stream.stream(
            self._core.list_namespaced_pod,
            workload.namespace,
            label_selector=_selector(obj),
            resource_version=resource_version,
            timeout_seconds=max(1, int(self.deadline_s)),
            _request_timeout=self.deadline_s + 5.0,
        ):
            pod = event["object"]
            if event["type"] == "DELETED" or pod.metadata.deletion_timestamp is not None:
                if pod.metadata.name not in removed:
                    removed.append(pod.metadata.name)
                if leaving <= set(removed):
                    stream.stop()
        return removed

    def _annotate(
        self, workload: PoolWorkload, obj: Any, annotations: Callable[[Any], dict[str, str]]
    ) -> None:
        patch = {
            "metadata": {"annotations": annotations(obj), "resourceVersion": obj.metadata.resource_version}
        }
        patch_fn = (
            self._apps.patch_namespaced_deployment
            if workload.kind == "Deployment"
            else self._apps.patch_namespaced_stateful_set
        )
        patch_fn(
            workload.name, workload.namespace, patch, _content_type=MERGE, _request_timeout=self.deadline_s
        )

    def _retrying(self, workload: PoolWorkload, attempt: Callable[[], None]) -> None:
        for n in range(self.conflict_retries + 1):
            try:
                attempt()
                return
            except ApiException as exc:
                if exc.status != 409 or n == self.conflict_retries:
                    raise
                log.info("%s %s: conflict (%s); reading it again", workload.kind, workload.name, exc.reason)

    def _list(self, workload: PoolWorkload, obj: Any) -> Any:
        return self._core.list_namespaced_pod(
            workload.namespace, label_selector=_selector(obj), _request_timeout=self.deadline_s
        )


def _selector(obj: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in (obj.spec.selector.match_labels or {}).items())


def _view(pod: Any) -> PodView:
    ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
    return PodView(pod.metadata.name, pod.status.phase or "Pending", bool(pod.spec.node_name), ready)


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.lstrip("-").isdigit() else None
