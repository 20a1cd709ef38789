"""The baseline connector (``kv.connector: nixl``), loaded through ``kv_connector_module_path``.

It is vLLM's ``NixlConnector`` (raw pull over NIXL/UCX) with one change on the decode side: the decode
worker admits the prompt *plus the prefill worker's first token*, and loads only the prompt's KV from the
prefill worker (``LoadParams.remote_tokens`` in the transfer params). vLLM then computes the first token's KV
locally and samples the second token, so decoding continues where prefill stopped instead of re-sampling
token one. Upstream would count every prompt token as remote, one more than the prefill worker holds.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector

from protocol.kv_handle import LoadParams


class PdflowNixlConnector(NixlConnector):
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Scheduler side, called when vLLM first schedules a waiting request; never blocks."""
        remote = LoadParams.remote_tokens_of(request.kv_transfer_params)
        if remote is not None:
            count = remote - num_computed_tokens
            if count > 0:
                return count, True
            return 0, False
        return super().get_num_new_matched_tokens(request, num_computed_tokens)
