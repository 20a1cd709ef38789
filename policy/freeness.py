"""Freeness, the one load formula (Llumnix): free KV blocks per request in the batch. Higher means more room
to grow. Dispatch, the migration policy and the choice of a manual migration's destination all rank decode
workers by it; what differs is only which blocks count as taken and which requests as the batch."""

from __future__ import annotations

from protocol.snapshots import InstanceSnapshot


def freeness(free_blocks: float, batch: int) -> float:
    """Free KV blocks per request of a ``batch`` (an empty batch counts as one request)."""
    return free_blocks / max(batch, 1)


def instance_freeness(instance: InstanceSnapshot, extra_requests: int = 0) -> float:
    """An instance's freeness by what it reported (used blocks; every request it runs or queues, by the
    freshest count), with ``extra_requests`` more placed on it since."""
    return freeness(instance.kv_blocks_total - instance.kv_blocks_used, instance.load + extra_requests)
