"""The keys pdflow puts in vLLM's ``kv_transfer_params``: shared by the engine host, which sets them, and the
connectors, which read them. Importing this module imports nothing else."""

from __future__ import annotations

DESTINATION = "pdflow_destination"  # prefill side: side-channel address of the decode worker receiving the KV
TRANSFER_ID = "pdflow_transfer_id"  # both sides: the transfer the request's KV travels in
CODEC = "pdflow_codec"  # prefill side, optional: a codec for this transfer only; absent, the policy decides
REMOTE_TOKENS = "pdflow_remote_tokens"  # decode side: prompt tokens whose KV comes from the prefill worker
# decode side, optional: the transfers the KV travels in, in token order, as [transfer id, first block] pairs
# (a live migration's pre-copy stages); absent, the whole KV travels in TRANSFER_ID from block 0
PARTS = "pdflow_parts"
# decode side, optional: the parts carry raw block images of a layout with this signature (a migration between
# engines that store blocks alike); the receiver checks it against its own before copying them in
BLOCK_FORMAT = "pdflow_block_format"
# decode side, optional: ids among PARTS still on their way when the request was handed over (a live migration
# hands the request over as its last stage starts); the receiver loads the other parts meanwhile and waits for
# these, and recomputes the KV if one never lands
IN_FLIGHT = "pdflow_in_flight"
# decode side, optional: load the parts but leave them landed (a request that primes the destination's prefix
# cache with a live migration's pre-copied stages before the hand-over; the request that continues the
# migrated one then finds their blocks cached, and loads the parts again only if the cache lost them)
KEEP = "pdflow_keep"


def parts(params: dict[str, object]) -> tuple[tuple[str, int], ...]:
    """The ``(transfer id, first block)`` pairs a decode request's KV travels in, in token order."""
    if PARTS in params:
        return tuple((str(tid), int(first)) for tid, first in params[PARTS])  # type: ignore[attr-defined]
    return ((str(params[TRANSFER_ID]), 0),)
