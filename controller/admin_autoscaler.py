"""The autoscaler's side of ``pdflow.v1.Admin``: its status and decisions as messages."""

from __future__ import annotations

from controller.autoscaling import AutoscalerStatus, DecisionRecord
from protocol.proto import admin_pb2
from protocol.snapshots import Role


def decision_message(record: DecisionRecord) -> admin_pb2.ScaleDecisionInfo:
    d, obs = record.decision, record.decision.observation
    return admin_pb2.ScaleDecisionInfo(
        decision_id=d.decision_id,
        at=record.at,
        reason=d.reason.value,
        detail=d.detail,
        prefill=d.prefill,
        decode=d.decode,
        victims=list(d.victims),
        restore=list(d.restore),
        flips=[f"{iid}->{role.value}" for iid, role in d.flips],
        cancel=list(d.cancel),
        remove=list(d.remove),
        actions=list(record.actions),
        manual=record.manual,
        decode_tps=obs.decode_tps,
        prefill_miss_tps=obs.prefill_miss_tps,
        ttft_p99_seconds=-1.0 if obs.ttft_p99_s is None else obs.ttft_p99_s,
        tpot_p99_seconds=-1.0 if obs.tpot_p99_s is None else obs.tpot_p99_s,
        instances=[f"{v.instance_id} {v.role.value} {v.state.value} {v.load}" for v in obs.instances],
    )


def status_message(status: AutoscalerStatus) -> admin_pb2.AutoscalerStatus:
    return admin_pb2.AutoscalerStatus(
        enabled=status.enabled,
        actuator=status.actuator,
        paused=status.paused,
        pools=[
            admin_pb2.PoolScale(
                role=role.value,
                desired=status.desired.get(role, 0),
                ready=status.ready.get(role, 0),
                pending=status.pending.get(role, 0),
                draining=status.draining.get(role, 0),
            )
            for role in (Role.PREFILL, Role.DECODE)
        ],
        decode_tps=status.decode_tps,
        prefill_miss_tps=status.prefill_miss_tps,
        decisions_by_reason=status.decisions,
        last=decision_message(status.last) if status.last is not None else None,
    )
