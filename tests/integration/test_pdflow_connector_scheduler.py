"""The scheduler half of ``PdflowConnector`` as vLLM's scheduler drives it (imports vLLM; no engine)."""

from __future__ import annotations

from types import SimpleNamespace

from kv_transfer.params import REMOTE_TOKENS, TRANSFER_ID


def _scheduler_half():  # type: ignore[no-untyped-def]
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kv_transfer.pdflow_connector import PdflowConnector

    config = SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_connector_extra_config={}, engine_id="d0"))
    return PdflowConnector(config, KVConnectorRole.SCHEDULER, None)  # type: ignore[arg-type]


class _Blocks:
    def __init__(self, ids: list[int]) -> None:
        self._ids = ids

    def get_block_ids(self) -> tuple[list[int]]:
        return (self._ids,)


def test_a_request_preempted_after_its_load_recomputes_instead_of_waiting_for_the_gone_transfer() -> None:
    connector = _scheduler_half()
    params = {TRANSFER_ID: "r1/handoff", REMOTE_TOKENS: 40}
    request = SimpleNamespace(request_id="r1", kv_transfer_params=params, num_prompt_tokens=41)
    assert connector.get_num_new_matched_tokens(request, 0) == (40, True)
    connector.update_state_after_alloc(request, _Blocks([0, 1, 2]), 40)
    meta = connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}))
    assert list(meta.loads) == ["r1"] and meta.loads["r1"].block_ids == [0, 1, 2]
    # vLLM preempts it (its computed tokens back to 0) and schedules it again: nothing to load any more.
    assert connector.get_num_new_matched_tokens(request, 0) == (0, False)
