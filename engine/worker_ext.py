"""Mixed into vLLM's worker class (``parallel_config.worker_extension_cls``) of every engine with the pdflow
connector, so that the engine host can reach the connector through ``AsyncLLM.collective_rpc`` (calls that
run in the engine core between two steps): attach the model runner's request states to it, renew, drop and
count KV, report its settings. Migration pushes, and their polling, go over the connector's side channel
instead, so that they never wait for a step, nor hold one up. The host imports this module only to name the
class; its methods run inside vLLM's worker process."""

from __future__ import annotations

from typing import Any


class MigrationWorkerExtension:
    model_runner: Any  # vLLM's worker has it

    def pdflow_attach(self) -> str:
        """Hand the pdflow connector the model runner's request states, so that migration pushes (asked for
        over the connector's side channel) find a request's blocks without waiting for a step. Returns the
        side channel's ``host:port`` (where other workers push KV to this one); "" under another connector."""
        connector = _connector()
        if connector is None:
            return ""
        connector.attach(self.model_runner.requests)
        return str(connector.address)

    def pdflow_drop_pushed(self, destination: str, transfer_ids: list[str], why: str) -> None:
        connector = _connector()
        if connector is not None:
            connector.drop_pushed(destination, transfer_ids, why)

    def pdflow_renew(self, transfer_ids: list[str]) -> list[str]:
        connector = _connector()
        return connector.renew(transfer_ids) if connector is not None else list(transfer_ids)

    def pdflow_kv_held(self) -> dict[str, int]:
        connector = _connector()
        return connector.held() if connector is not None else {}

    def pdflow_settings(self) -> dict[str, Any]:
        """The KV transfer settings the connector runs with (``KVTransferConfig``, as JSON)."""
        connector = _connector()
        return connector.settings.model_dump(mode="json") if connector is not None else {}


def _connector() -> Any:
    """The engine's pdflow connector (worker half), or None under another connector."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    connector = get_kv_transfer_group() if has_kv_transfer_group() else None
    return connector if hasattr(connector, "attach") else None
