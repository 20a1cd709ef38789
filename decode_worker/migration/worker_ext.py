"""Mixed into vLLM's worker class (``parallel_config.worker_extension_cls``) so that the decode worker can
reach a running request's KV blocks through ``AsyncLLM.collective_rpc``. Those calls run in the engine core
between two steps, so the request's block table cannot change under them; the pushes themselves run on the
connector's push thread unless asked to block. Imported only inside vLLM's engine process."""

from __future__ import annotations

from typing import Any


class MigrationWorkerExtension:
    model_runner: Any  # vLLM's worker has it

    def pdflow_push_blocks(
        self,
        request_id: str,
        transfer_id: str,
        destination: str,
        first_block: int,
        end_block: int,
        expected: list[int],
        background: bool,
    ) -> dict[str, Any]:
        """Push blocks ``[first_block, end_block)`` of ``request_id`` to ``destination``. ``expected`` is the
        block table the earlier stages pushed from: a request preempted since then holds other blocks, and the
        migration must stop. Returns ``{"block_ids": [...], "record": {...} | None}``, or ``{"error": ...}``
        when the push cannot start."""
        state = _running(self.model_runner.requests, request_id)
        if state is None:
            return {"error": f"request {request_id} is not running on this engine"}
        blocks = [int(b) for b in state.block_ids[0]]
        if blocks[: len(expected)] != list(expected):
            return {"error": f"request {request_id} was preempted since the last stage (its blocks changed)"}
        if not 0 <= first_block <= end_block <= len(blocks):
            return {"error": f"blocks [{first_block}, {end_block}) of {request_id}: it holds {len(blocks)}"}
        connector = _connector()
        if connector is None:
            return {"error": "the engine's KV connector cannot migrate (pdflow connector required)"}
        record = connector.push_blocks(
            request_id, transfer_id, destination, blocks[first_block:end_block], background=background
        )
        return {"block_ids": blocks[:end_block], "record": record}

    def pdflow_push_status(self, transfer_id: str) -> dict[str, Any] | None:
        connector = _connector()
        if connector is None:
            return {"transfer_id": transfer_id, "outcome": "failed", "error": "no pdflow connector"}
        status: dict[str, Any] | None = connector.push_status(transfer_id)
        return status

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


def _connector() -> Any:
    """The engine's pdflow connector (worker half), or None under another connector."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    connector = get_kv_transfer_group() if has_kv_transfer_group() else None
    return connector if hasattr(connector, "push_blocks") else None


def _running(requests: dict[str, Any], request_id: str) -> Any:
    """The runner's state of ``request_id``: vLLM keys requests by the client's id plus ``-`` and eight
    random characters (``InputProcessor``)."""
    if request_id in requests:
        return requests[request_id]
    found = [
        s
        for key, s in requests.items()
        if key.startswith(f"{request_id}-") and len(key) == len(request_id) + 9
    ]
    return found[0] if len(found) == 1 else None
