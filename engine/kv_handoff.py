"""How a prefill engine's KV reaches the decode engine: the two strategies the vLLM engine host can run with,
behind one interface (``kv.connector`` picks one).

- ``PdflowHandoff``: pdflow's connector. The prefill engine pushes the prompt's KV layer by layer to the
  decode worker named in the request, compressed as the codec policy says; the prefill returns once it
  landed (or failed: the decode worker then recomputes the prompt), with the transfer's record. The decode
  engine loads the landed parts; live migration and priming work.
- ``NixlHandoff``: vLLM's NixlConnector, the baseline. The prefill engine keeps the KV and hands back vLLM's
  own parameters; the decode engine pulls it. No migration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from engine.stats import EngineStats
from protocol.errors import WorkerFailed
from protocol.kv_config import KVConnectorKind, KVTransferConfig
from protocol.kv_handle import KVHandle, LoadParams, SaveParams, handoff_transfer_id
from protocol.messages import PrefillRequest
from protocol.transfers import TransferOutcome, TransferRecord

log = logging.getLogger(__name__)
_RECORD_WAIT_S = 2.0


@dataclass(frozen=True, slots=True)
class ConnectorSpec:
    """What vLLM's ``KVTransferConfig`` needs to load a connector."""

    module: str
    name: str
    extra: dict[str, Any]


class KVHandoff(Protocol):
    migratable: bool
    """Live migration (pushes of a running request's blocks) and priming are possible."""

    def connector(self) -> ConnectorSpec:
        """The connector vLLM loads (imports the connector's module: call once vLLM is imported)."""

    def prefill_params(self, request: PrefillRequest) -> dict[str, Any] | None:
        """The prefill's ``kv_transfer_params``: None when its KV stays here (no decode worker follows)."""

    async def prefill_done(self, request: PrefillRequest, vllm_params: dict[str, Any] | None) -> PrefillDone:
        """After a completed prefill that hands off (``vllm_params``: what vLLM's connector returned): where
        its KV is (None if the transfer failed: the decode worker recomputes), and the transfer's record."""

    def load_params(self, handle: KVHandle, remote_tokens: int, *, keep: bool = False) -> dict[str, Any]:
        """A decode's ``kv_transfer_params``: load the first ``remote_tokens`` tokens from ``handle``."""


@dataclass(frozen=True, slots=True)
class PrefillDone:
    handle: KVHandle | None  # None: the decode worker recomputes the prompt
    transfer: TransferRecord | None = None


class PdflowHandoff:
    migratable = True

    def __init__(self, settings: KVTransferConfig, stats: EngineStats) -> None:
        self._settings = settings
        self._stats = stats

    def connector(self) -> ConnectorSpec:
        from kv_transfer.vllm.connector import PdflowConnector

        return ConnectorSpec(PdflowConnector.__module__, PdflowConnector.__name__, self.extra_config())

    def extra_config(self) -> dict[str, Any]:
        """The connector's settings as vLLM carries them (``KVTransferConfig.from_connector`` reads them)."""
        return self._settings.to_connector()

    def prefill_params(self, request: PrefillRequest) -> dict[str, Any] | None:
        if not request.hand_off:
            return None
        if not request.kv_destination:
            raise WorkerFailed(f"prefill of {request.request_id}: no decode worker KV endpoint to push to")
        save = SaveParams(handoff_transfer_id(request.request_id), request.kv_destination, request.kv_codec)
        return save.to_params()

    async def prefill_done(self, request: PrefillRequest, vllm_params: dict[str, Any] | None) -> PrefillDone:
        transfer_id = handoff_transfer_id(request.request_id)
        # The record comes back through vLLM's connector stats, handled just after the request's output.
        record = await self._stats.wait_record(transfer_id, _RECORD_WAIT_S)
        if record is None:
            log.warning("prefill of %s: the KV transfer left no record; it is recomputed", request.request_id)
            return PrefillDone(None)
        if record.outcome is not TransferOutcome.SUCCESS:
            log.warning("prefill of %s: %s; it is recomputed", request.request_id, record.error)
            return PrefillDone(None, record)
        # raw block images (codec none from the registered cache): the decode side copies them in as they are
        return PrefillDone(KVHandle.handoff(transfer_id, record.block_format), record)

    def load_params(self, handle: KVHandle, remote_tokens: int, *, keep: bool = False) -> dict[str, Any]:
        return LoadParams(handle, remote_tokens, keep).to_params()


class NixlHandoff:
    migratable = False

    def __init__(self, settings: KVTransferConfig) -> None:
        self._settings = settings

    def connector(self) -> ConnectorSpec:
        from kv_transfer.vllm.nixl_baseline import PdflowNixlConnector

        extra = {"kv_lease_duration": self._settings.lease_seconds}
        return ConnectorSpec(PdflowNixlConnector.__module__, PdflowNixlConnector.__name__, extra)

    def prefill_params(self, request: PrefillRequest) -> dict[str, Any] | None:
        return {"do_remote_decode": True} if request.hand_off else None

    async def prefill_done(self, request: PrefillRequest, vllm_params: dict[str, Any] | None) -> PrefillDone:
        return PrefillDone(KVHandle(nixl=dict(vllm_params)) if vllm_params else None)

    def load_params(self, handle: KVHandle, remote_tokens: int, *, keep: bool = False) -> dict[str, Any]:
        return LoadParams(handle, remote_tokens, keep).to_params()


def kv_handoff(settings: KVTransferConfig, stats: EngineStats) -> KVHandoff:
    """The strategy ``settings.connector`` names."""
    if settings.connector is KVConnectorKind.PDFLOW:
        return PdflowHandoff(settings, stats)
    return NixlHandoff(settings)
