"""The pdflow connector on real engines: with codec ``none`` and with the lossless codec the decode worker
continues with exactly the colocated engine's tokens, and each hand-off leaves a transfer record."""

from __future__ import annotations

from typing import Any

import pytest

from protocol.ids import RequestId
from protocol.kv_config import KVCodecKind
from protocol.messages import DecodeRequest, PrefillRequest, SamplingSpec
from protocol.snapshots import Role
from protocol.transfers import TransferOutcome
from tests.e2e.conftest import E2ECluster
from tests.e2e.prompts import CHAT_PROMPTS
from tests.e2e.test_serving import _reference

pytestmark = pytest.mark.e2e

MAX_TOKENS = 32


async def _handoff(
    cluster: E2ECluster, rid: str, prompt: tuple[int, ...], codec: str
) -> tuple[list[int], Any]:
    sampling = SamplingSpec(max_tokens=MAX_TOKENS, temperature=0.0, seed=0)
    destination = cluster.snapshot(Role.DECODE).kv_endpoint
    result = await cluster.worker(Role.PREFILL).prefill.remote(
        PrefillRequest(
            RequestId(rid), prompt, sampling, kv_destination=destination, kv_codec=KVCodecKind(codec)
        )
    )
    tokens = [result.first_token_id]
    decode_record = None
    request = DecodeRequest(RequestId(rid), prompt, result.first_token_id, sampling, result.kv_handle)
    async for ref in cluster.worker(Role.DECODE).decode.options(num_returns="streaming").remote(request):
        chunk = await ref
        decode_record = decode_record or chunk.transfer
        tokens.extend(chunk.token_ids)
    return tokens, (result.transfer, decode_record)


@pytest.mark.parametrize("codec", ["none", "lossless"])
async def test_exact_codecs_give_the_colocated_tokens(
    cluster: E2ECluster, model_tokenizer: Any, codec: str
) -> None:
    prompts = [
        tuple(model_tokenizer.apply_chat_template([{"role": "user", "content": p}])) for p in CHAT_PROMPTS[:8]
    ]
    # One at a time: batched CPU kernels are not batch-invariant (see test_serving).
    served = [await _handoff(cluster, f"{codec}-{i}", p, codec) for i, p in enumerate(prompts)]
    expected = [await _reference(cluster, list(p), MAX_TOKENS) for p in prompts]
    for prompt, (tokens, (sent, landed)), want in zip(prompts, served, expected, strict=True):
        assert tokens == want, f"{codec}: {tokens} != colocated {want}"
        assert sent.codec == codec and sent.outcome is TransferOutcome.SUCCESS
        # whole 128-token blocks move; SmolLM2: 30 layers, 3 KV heads, head dim 64, bf16
        assert sent.tokens == -(-len(prompt) // 128) * 128 and sent.layers == 30
        assert sent.raw_bytes == sent.tokens * 30 * 2 * 3 * 64 * 2
        if codec == "lossless":
            assert sent.wire_bytes < sent.raw_bytes
        assert landed is not None and landed.transfer_id == sent.transfer_id and landed.decode_s > 0
