"""The codecs on a GPU: payload parts stay on the device (lossless excepted: zstd runs on the CPU) and the
error bounds hold. Collected only where CUDA is available (see conftest.py)."""

from __future__ import annotations

import pytest
import torch

from kv_transfer.codec import CODEC_NAMES, KVKind, get_codec
from tests.support.codecs import error_bound, kv_like, same_bits


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_codecs_run_on_gpu(name: str) -> None:
    kv = kv_like((300, 8, 128), torch.bfloat16).cuda()
    codec = get_codec(name)
    for kind in KVKind:
        enc = codec.encode(kv, kind)
        out = codec.decode(enc)
        if name == "lossless":  # zstd runs on the CPU
            assert same_bits(out, kv.cpu())
            continue
        assert all(part.data.is_cuda for part in enc.parts) and out.is_cuda
        if name == "none":
            assert same_bits(out, kv)
        else:
            assert ((out - kv).float().abs() <= error_bound(name, enc, kv, out)).all()
