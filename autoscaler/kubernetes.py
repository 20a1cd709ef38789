"""The Kubernetes actuator: sizes each pool's Deployment or StatefulSet through its ``/scale`` subresource.
The only pdflow code that imports ``kubernetes``.

Scaling out sets the replicas. Scaling in removes exactly the instance the autoscaler drained, and proves it:
- a Deployment's ReplicaSet chooses which pod to delete, and it deletes unscheduled, Pending and not-ready
  pods before it even looks at ``controller.kubernetes.io/pod-deletion-cost``; so the actuator never scales a
  pool in while one of its pods is Pending (except to cancel exactly those pods), annotates the drained victim
  with the lowest deletion cost, reads it back until the annotation shows, lowers the replicas, then watches
  the pods until the victim is gone and checks that no other pod went with it;
- a StatefulSet ignores deletion costs and removes its highest ordinal, so that is the only victim it takes
  (``victim_order`` tells the autoscaler which to drain).

pdflow writes the replicas it sets into the workload's ``pdflow.io/replicas`` annotation first. A workload
whose replicas differ from it was scaled by someone else (``kubectl scale``, an HPA): the actuator holds it
(``MANUAL_OVERRIDE``) until an operator resumes it. Writes carry the ``resourceVersion`` they read; a 409
Conflict is read again and retried. Each call names the decision it carries out and is idempotent: a
decision already applied (``pdflow.io/decision-id``) changes nothing.

RBAC: exactly ``RBAC_RULES``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from protocol.actuation import Actuation, Outcome, PoolMembers
from protocol.snapshots import Role

log = logging.getLogger(__name__)

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
VICTIM_COST = "-2147483648"  # the lowest an int32 cost can be: deleted before every other ready pod
REPLICAS = "pdflow.io/replicas"  # the replicas pdflow set last
DECISION = "pdflow.io/decision-id"  # the decision that set them
MERGE = "application/merge-patch+json"

RBAC_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (API group, resource, verbs): the actuator needs these and nothing else
    ("apps", "deployments", ("get", "patch")),
    ("apps", "statefulsets", ("get", "patch")),
    ("apps", "deployments/scale", ("get", "update")),
    ("apps", "statefulsets/scale", ("get", "update")),
    ("", "pods", ("get", "list", "watch", "patch")),
)


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


@dataclass(frozen=True, slots=True)
class PoolStatus:
    replicas: int
    set_by_pdflow: int | None  # the replicas pdflow set last (None: never)
    decision_id: str
    pods: tuple[PodView, ...]

    @property
    def manual_override(self) -> bool:
        """Someone else changed the replicas since pdflow set them."""
        return self.set_by_pdflow is not None and self.set_by_pdflow != self.replicas

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.pods if p.pending)

    @property
    def not_ready(self) -> tuple[str, ...]:
        """Pods a ReplicaSet deletes before it looks at deletion costs: Pending ones and not-ready ones."""
        return tuple(p.name for p in self.pods if p.pending or not p.ready)


@dataclass
class KubernetesActuator:
    workloads: dict[Role, PoolWorkload]
    api: Any  # a kubernetes ApiClient
    deadline_s: float = 60.0
    conflict_retries: int = 5
    _apps: Any = field(init=False)
    _core: Any = field(init=False)

    def __post_init__(self) -> None:
        self._apps = client.AppsV1Api(self.api)
        self._core = client.CoreV1Api(self.api)

    @classmethod
    def from_kubeconfig(
        cls, path: Path | None, workloads: dict[Role, PoolWorkload], **settings: Any
    ) -> KubernetesActuator:
        """From a kubeconfig file, or (``path`` None) the pod's service account inside a cluster."""
        if path is None:
            config.load_incluster_config()
            return cls(workloads, client.ApiClient(), **settings)
        return cls(workloads, config.new_client_from_config(config_file=str(path)), **settings)

    kind = "kubernetes"

    # ---- reading ----

    def members(self, role: Role) -> PoolMembers:
        status = self.status(role)
        hold = ""
        if status.manual_override:
            workload = self.workloads[role]
            hold = (
                f"manual_override: {workload.kind} {workload.name} has {status.replicas} replicas, "
                f"pdflow set {status.set_by_pdflow}"
            )
        return PoolMembers(status.replicas, tuple(p.name for p in status.pods), status.not_ready, hold)

    def status(self, role: Role) -> PoolStatus:
        workload = self.workloads[role]
        obj = self._get(workload)
        annotations = obj.metadata.annotations or {}
        pods = self._pods(workload, obj)
        set_by = annotations.get(REPLICAS)
        return PoolStatus(
            int(obj.spec.replicas or 0),
            int(set_by) if set_by is not None else None,
            annotations.get(DECISION, ""),
            pods,
        )

    def victim_order(self, role: Role, candidates: list[str]) -> list[str]:
        """The instances (pod names) this workload can remove, in the order it would: a StatefulSet only its
        highest ordinal; a Deployment any, in the order given."""
        if self.workloads[role].kind != "StatefulSet":
            return list(candidates)
        highest = max(candidates, key=_ordinal, default=None)
        return [highest] if highest is not None else []

    # ---- acting ----

    def resume(self, role: Role) -> PoolMembers:
        """An operator's word after a manual override: the workload's replicas are pdflow's again."""
        workload = self.workloads[role]
        obj = self._get(workload)
        self._annotate(workload, obj, {REPLICAS: str(obj.spec.replicas or 0)})
        return self.members(role)

    def scale(
        self,
        decision_id: str,
        role: Role,
        replicas: int,
        *,
        victims: tuple[str, ...] = (),
        cancel: tuple[str, ...] = (),
    ) -> Actuation:
        """Bring ``role``'s workload to ``replicas`` for decision ``decision_id``: up by raising the replicas;
        down by removing exactly ``victims`` (drained instances) or ``cancel`` (Pending ones). Idempotent."""
        workload = self.workloads[role]
        status = self.status(role)
        before = status.replicas
        done = Actuation(decision_id, role, Outcome.UNCHANGED, before, before)
        if status.decision_id == decision_id and before == replicas:
            return done
        if status.manual_override:
            detail = (
                f"{workload.kind} {workload.name} has {before} replicas, pdflow set {status.set_by_pdflow}"
            )
            return Actuation(decision_id, role, Outcome.MANUAL_OVERRIDE, before, before, detail=detail)
        if replicas == before:
            if status.set_by_pdflow is None:  # first sight of the workload: its replicas become pdflow's
                self._annotate(workload, self._get(workload), {REPLICAS: str(before), DECISION: decision_id})
            return done
        if replicas > before:
            self._set_replicas(workload, decision_id, replicas)
            return Actuation(decision_id, role, Outcome.APPLIED, before, replicas)
        leaving = tuple(cancel) or tuple(victims)
        if len(leaving) != before - replicas:
            detail = (
                f"{before} -> {replicas} replicas needs {before - replicas} named instances, got {leaving}"
            )
            return Actuation(decision_id, role, Outcome.REFUSED, before, before, detail=detail)
        names = {p.name for p in status.pods}
        if cancel:
            if not set(cancel) <= set(status.pending):
                detail = (
                    f"only Pending pods can be cancelled; {sorted(set(cancel) - set(status.pending))} are not"
                )
                return Actuation(decision_id, role, Outcome.REFUSED, before, before, detail=detail)
        elif status.not_ready:  # the ReplicaSet (or an ordinal count) would take one of them, not the victim
            detail = (
                f"pods {list(status.not_ready)} are Pending or not ready: no scale-in until they are ready"
            )
            return Actuation(decision_id, role, Outcome.PENDING, before, before, detail=detail)
        if not set(leaving) <= names:
            detail = f"{sorted(set(leaving) - names)} are not pods of {workload.name}"
            return Actuation(decision_id, role, Outcome.REFUSED, before, before, detail=detail)
        if workload.kind == "StatefulSet":
            highest = sorted(names, key=_ordinal)[replicas:]
            if sorted(leaving) != sorted(highest):
                detail = f"a StatefulSet removes its highest ordinals {highest}, not {sorted(leaving)}"
                return Actuation(decision_id, role, Outcome.REFUSED, before, before, detail=detail)
        elif not cancel:
            for victim in leaving:
                self._mark_victim(workload, victim)
        resource_version = self._pods_version(workload)
        self._set_replicas(workload, decision_id, replicas)
        removed = self._wait_removed(workload, set(leaving), resource_version)
        if set(removed) != set(leaving):
            detail = f"{workload.kind} {workload.name} removed {sorted(removed)}, not {sorted(leaving)}"
            log.error("%s", detail)
            return Actuation(decision_id, role, Outcome.FAILED, before, replicas, tuple(removed), detail)
        return Actuation(decision_id, role, Outcome.APPLIED, before, replicas, tuple(removed))

    # ---- helpers ----

    def _get(self, workload: PoolWorkload) -> Any:
        read = (
            self._apps.read_namespaced_deployment
            if workload.kind == "Deployment"
            else self._apps.read_namespaced_stateful_set
        )
        return read(workload.name, workload.namespace, _request_timeout=self.deadline_s)

    def _pods(self, workload: PoolWorkload, obj: Any) -> tuple[PodView, ...]:
        selector = ",".join(f"{k}={v}" for k, v in (obj.spec.selector.match_labels or {}).items())
        pods = self._core.list_namespaced_pod(
            workload.namespace, label_selector=selector, _request_timeout=self.deadline_s
        )
        return tuple(_view(p) for p in pods.items)

    def _pods_version(self, workload: PoolWorkload) -> str:
        obj = self._get(workload)
        selector = ",".join(f"{k}={v}" for k, v in (obj.spec.selector.match_labels or {}).items())
        listed = self._core.list_namespaced_pod(
            workload.namespace, label_selector=selector, _request_timeout=self.deadline_s
        )
        return str(listed.metadata.resource_version)

    def _annotate(self, workload: PoolWorkload, obj: Any, annotations: dict[str, str]) -> None:
        patch = {"metadata": {"annotations": annotations, "resourceVersion": obj.metadata.resource_version}}
        patch_fn = (
            self._apps.patch_namespaced_deployment
            if workload.kind == "Deployment"
            else self._apps.patch_namespaced_stateful_set
        )
        patch_fn(
            workload.name, workload.namespace, patch, _content_type=MERGE, _request_timeout=self.deadline_s
        )

    def _set_replicas(self, workload: PoolWorkload, decision_id: str, replicas: int) -> None:
        """Record the replicas as pdflow's, then set them through ``/scale``; a 409 is read again, retried."""
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
        for attempt in range(self.conflict_retries + 1):
            try:
                self._annotate(
                    workload, self._get(workload), {REPLICAS: str(replicas), DECISION: decision_id}
                )
                scale = read_scale(workload.name, workload.namespace, _request_timeout=self.deadline_s)
                scale.spec.replicas = replicas
                replace_scale(workload.name, workload.namespace, scale, _request_timeout=self.deadline_s)
                return
            except ApiException as exc:
                if exc.status != 409 or attempt == self.conflict_retries:
                    raise
                log.info(
                    "scaling %s %s: conflict (%s); reading it again", workload.kind, workload.name, exc.reason
                )

    def _mark_victim(self, workload: PoolWorkload, pod_name: str) -> None:
        """The lowest deletion cost on the victim, read back until it shows: the ReplicaSet must see it."""
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

    def _wait_removed(self, workload: PoolWorkload, leaving: set[str], resource_version: str) -> list[str]:
        """Watch the workload's pods from ``resource_version`` until ``leaving`` are deleted (or the
        deadline); every pod deleted meanwhile."""
        obj = self._get(workload)
        selector = ",".join(f"{k}={v}" for k, v in (obj.spec.selector.match_labels or {}).items())
        removed: list[str] = []
        stream = watch.Watch()
        for event in stream.stream(
            self._core.list_namespaced_pod,
            workload.namespace,
            label_selector=selector,
            resource_version=resource_version,
            timeout_seconds=int(self.deadline_s),
        ):
            if event["type"] == "DELETED":
                removed.append(event["object"].metadata.name)
                if leaving <= set(removed):
                    stream.stop()
        return removed


def _view(pod: Any) -> PodView:
    ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
    return PodView(pod.metadata.name, pod.status.phase or "Pending", bool(pod.spec.node_name), ready)


def _ordinal(name: str) -> int:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1
