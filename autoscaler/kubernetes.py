"""The Kubernetes actuator: sizes each pool's Deployment or StatefulSet through its ``/scale`` subresource.
The only pdflow code that imports ``kubernetes``.

Scaling out sets the replicas. Scaling in removes exactly the instance the autoscaler drained, and proves it:
- a Deployment's ReplicaSet chooses which pod to delete, and it deletes unscheduled, Pending and not-ready
  pods before it even looks at ``controller.kubernetes.io/pod-deletion-cost``; so the actuator never removes
  a drained victim while another pod of the pool is Pending or not ready, and cancels pods on their way only
  when no pod it keeps is of a class the ReplicaSet would take first. It annotates the pods that leave with
  the lowest deletion cost, reads that back until it shows, lowers the replicas, then watches the pods until
  the ones leaving are being deleted (a pod's graceful end, its preStop drain included, may take long) and
  checks that no other pod went;
- a StatefulSet ignores deletion costs and removes its highest ordinal, so that is the only victim it takes
  (``victim_order`` tells the autoscaler which to drain).

pdflow records the replicas it sets (and those before, and the decision) in the workload's annotations
first. A workload whose replicas are neither was scaled by someone else (``kubectl scale``, an HPA): the
actuator holds it (``MANUAL_OVERRIDE``) until an operator resumes it; replicas still at the ones before are a
write that did not land, and the same decision sent again writes them. Writes carry the ``resourceVersion``
they read; a 409 Conflict is read again and retried. Each call names the decision it carries out and is
idempotent: a decision already applied (``pdflow.io/decision-id``) changes nothing. Pods being deleted
(Terminating) are no longer members.

RBAC: exactly ``RBAC_RULES``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config

from autoscaler.kube_api import DECISION, REPLICAS, PoolStatus, PoolWorkload, WorkloadApi
from protocol.actuation import Actuation, Outcome, PoolMembers
from protocol.config import ClusterConfig
from protocol.snapshots import Role

log = logging.getLogger(__name__)
__all__ = ["RBAC_RULES", "KubernetesActuator", "PoolWorkload"]

RBAC_RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    # (API group, resource, verbs): the actuator needs these and nothing else
    ("apps", "deployments", ("get", "patch")),
    ("apps", "statefulsets", ("get", "patch")),
    ("apps", "deployments/scale", ("get", "update")),
    ("apps", "statefulsets/scale", ("get", "update")),
    ("", "pods", ("get", "list", "watch", "patch")),
)


@dataclass
class KubernetesActuator:
    workloads: dict[Role, PoolWorkload]
    api: Any  # a kubernetes ApiClient
    deadline_s: float = 60.0
    conflict_retries: int = 5
    kind = "kubernetes"
    # a pod belongs to its pool's workload: a role switch removes it there and starts one in the other pool
    switches_in_place = False
    _calls: WorkloadApi = field(init=False)

    kubeconfig: Path | None = None  # where ``api`` came from (None: the pod's service account)

    def __post_init__(self) -> None:
        self._calls = WorkloadApi(self.api, self.deadline_s, self.conflict_retries)

    @classmethod
    def from_kubeconfig(
        cls, path: Path | None, workloads: dict[Role, PoolWorkload], **settings: Any
    ) -> KubernetesActuator:
        """From a kubeconfig file, or (``path`` None) the pod's service account inside a cluster."""
        if path is None:
            config.load_incluster_config()
            return cls(workloads, client.ApiClient(), kubeconfig=None, **settings)
        api = config.new_client_from_config(config_file=str(path))
        return cls(workloads, api, kubeconfig=path, **settings)

    @classmethod
    def from_config(cls, cfg: ClusterConfig) -> KubernetesActuator:
        """The pools as ``cfg.kubernetes`` names them (what the Helm chart's head runs)."""
        k = cfg.kubernetes
        workloads = {
            Role.PREFILL: PoolWorkload(k.workload_kind.value, k.prefill_workload, k.namespace),
            Role.DECODE: PoolWorkload(k.workload_kind.value, k.decode_workload, k.namespace),
        }
        return cls.from_kubeconfig(k.kubeconfig, workloads)

    def __getstate__(self) -> dict[str, Any]:
        """Settings only (it is handed to the controller actor): the client is made again where it lands."""
        return {
            "workloads": self.workloads,
            "kubeconfig": self.kubeconfig,
            "deadline_s": self.deadline_s,
            "conflict_retries": self.conflict_retries,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        made = self.from_kubeconfig(
            state["kubeconfig"],
            state["workloads"],
            deadline_s=state["deadline_s"],
            conflict_retries=state["conflict_retries"],
        )
        self.__dict__.update(made.__dict__)

    # ---- reading ----

    def status(self, role: Role) -> PoolStatus:
        return self._calls.status(self.workloads[role])

    def members(self, role: Role) -> PoolMembers:
        status = self.status(role)
        hold = ""
        if status.manual_override:
            workload = self.workloads[role]
            hold = (
                f"manual_override: {workload.kind} {workload.name} has {status.replicas} replicas, "
                f"pdflow set {status.set_by_pdflow}"
            )
        return PoolMembers(status.replicas, tuple(p.name for p in status.pods), status.pending, hold)

    def victim_order(self, role: Role, candidates: list[str]) -> list[str]:
        """The instances (pod names) this workload can remove, in the order it would: a StatefulSet only its
        highest ordinal; a Deployment any, in the order given."""
        if self.workloads[role].kind != "StatefulSet":
            return list(candidates)
        highest = max(candidates, key=_ordinal, default=None)
        return [highest] if highest is not None else []

    # ---- acting ----

    def switch(self, decision_id: str, instance_id: str, role: Role) -> Actuation:
        """Not in place: the workload that owns a pod would replace a pod that left it."""
        replicas = self.status(role).replicas
        detail = f"{instance_id}: a pod stays in its workload; switched by removing it and starting one"
        return Actuation(decision_id, role, Outcome.REFUSED, replicas, replicas, detail=detail)

    def resume(self, role: Role) -> PoolMembers:
        """An operator's word after a manual override: the workload's replicas are pdflow's again."""
        self._calls.annotate(self.workloads[role], lambda obj: {REPLICAS: str(obj.spec.replicas or 0)})
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
        down by removing exactly ``victims`` (drained instances) or ``cancel`` (pods on their way).
        Idempotent."""
        workload = self.workloads[role]
        status = self.status(role)
        before = status.replicas
        if status.decision_id == decision_id and not status.write_lost:
            return Actuation(decision_id, role, Outcome.UNCHANGED, before, before, detail="applied before")
        if status.manual_override:
            detail = (
                f"{workload.kind} {workload.name} has {before} replicas, pdflow set {status.set_by_pdflow}"
            )
            return Actuation(decision_id, role, Outcome.MANUAL_OVERRIDE, before, before, detail=detail)
        if replicas == before:
            if status.set_by_pdflow is None:  # first sight of the workload: its replicas become pdflow's
                record = {REPLICAS: str(before), DECISION: decision_id}
                self._calls.annotate(workload, lambda _: record)
            return Actuation(decision_id, role, Outcome.UNCHANGED, before, before)
        if replicas > before:
            self._calls.set_replicas(workload, decision_id, replicas)
            return Actuation(decision_id, role, Outcome.APPLIED, before, replicas)
        refusal = self._refusal(workload, status, replicas, victims, cancel)
        if refusal is not None:
            outcome, detail = refusal
            return Actuation(decision_id, role, outcome, before, before, detail=detail)
        leaving = set(cancel or victims)
        if workload.kind == "Deployment":
            for name in sorted(leaving):
                self._calls.mark_victim(workload, name)
        resource_version = self._calls.pods_version(workload)
        self._calls.set_replicas(workload, decision_id, replicas)
        removed = self._calls.wait_removed(workload, leaving, resource_version)
        if set(removed) != leaving:
            detail = f"{workload.kind} {workload.name} removed {sorted(removed)}, not {sorted(leaving)}"
            log.error("%s", detail)
            return Actuation(decision_id, role, Outcome.FAILED, before, replicas, tuple(removed), detail)
        return Actuation(decision_id, role, Outcome.APPLIED, before, replicas, tuple(removed))

    def _refusal(
        self,
        workload: PoolWorkload,
        status: PoolStatus,
        replicas: int,
        victims: tuple[str, ...],
        cancel: tuple[str, ...],
    ) -> tuple[Outcome, str] | None:
        """Why this scale-in cannot remove exactly the pods named (None: it can)."""
        leaving = set(cancel or victims)
        wanted = status.replicas - replicas
        if len(leaving) != wanted:
            return (
                Outcome.REFUSED,
                f"{status.replicas} -> {replicas} replicas needs {wanted} named pods, got {sorted(leaving)}",
            )
        pods = {p.name: p for p in status.pods}
        if not leaving <= pods.keys():
            return Outcome.REFUSED, f"{sorted(leaving - pods.keys())} are not live pods of {workload.name}"
        if workload.kind == "StatefulSet":
            highest = sorted(pods, key=_ordinal)[replicas:]
            if sorted(leaving) != sorted(highest):
                return (
                    Outcome.REFUSED,
                    f"a StatefulSet removes its highest ordinals {highest}, not {sorted(leaving)}",
                )
            return None
        if cancel:
            ready = sorted(leaving - set(status.not_ready))
            if ready:
                return Outcome.REFUSED, f"{ready} are ready: only pods on their way can be cancelled"
            worst = max(pods[n].deletion_class for n in leaving)
            first = sorted(n for n, p in pods.items() if n not in leaving and p.deletion_class < worst)
            if first:
                return Outcome.REFUSED, f"the ReplicaSet would delete {first} first: cancel them too"
            return None
        others = sorted(set(status.not_ready) - leaving)
        if others:  # the ReplicaSet would take one of them, not the victim
            return (
                Outcome.PENDING,
                f"pods {others} are Pending or not ready: no scale-in until they are ready",
            )
        return None


def _ordinal(name: str) -> int:
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1
