"""The int8/int4 CPU kernels (``kv_transfer/codec/native.py``): the same wire bytes as the torch path, so
either side of a transfer may use either; decoding within one rounding of it; the same errors; and a codec
that still works where the kernels cannot be built."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kv_transfer.codec import KVKind, get_codec, native
from kv_transfer.codec.rounding import LOG_SCALE_TABLE

SHAPES = [
    (512, 15, 64),  # five SmolLM2 layers side by side, as a transfer's slot
    (300, 8, 128),  # tokens not a multiple of the group
    (77, 2, 50),  # head_dim not a multiple of the group or of the kernels' vector width
    (9, 3, 5),  # an odd number of codes a token: int4 pairs straddle tokens
    (1, 1, 1),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def torch_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Codec calls from here on take the torch path."""
    monkeypatch.setenv("PDFLOW_NATIVE_CODECS", "0")


def kv_like(shape: tuple[int, int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    offset = torch.randn(1, shape[1], shape[2], generator=gen) * 4  # channel offsets, as real keys have
    return (torch.randn(shape, generator=gen) * 2 + offset).to(dtype)


def both_paths(
    monkeypatch: pytest.MonkeyPatch, name: str, kv: torch.Tensor, kind: KVKind
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(kernel parts, torch parts, kernel decode, torch decode of the torch parts)."""
    codec = get_codec(name, exact_tokens=0)
    fast = codec.encode(kv, kind)
    fast_out = codec.decode(fast)
    with monkeypatch.context() as m:
        torch_only(m)
        slow = codec.encode(kv, kind)
        slow_out = codec.decode(slow)
    return [p.data for p in fast.parts], [p.data for p in slow.parts], fast_out, slow_out


def test_the_kernels_build_on_this_machine() -> None:
    """CI and the benchmarks' figures assume the kernels: a silent fallback to torch would hide a slowdown."""
    assert native.library() is not None


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", list(KVKind))
def test_kernels_put_the_torch_paths_bytes_on_the_wire(
    monkeypatch: pytest.MonkeyPatch, name: str, dtype: torch.dtype, shape: tuple[int, int, int], kind: KVKind
) -> None:
    kv = kv_like(shape, dtype, seed=sum(shape) + len(name) + len(kind.value))  # the same data every run
    fast, slow, fast_out, slow_out = both_paths(monkeypatch, name, kv, kind)
    for a, b in zip(fast, slow, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    # Decoding computes zero + code * scale in fp32 and rounds once; torch may fuse the multiply-add or not
    # (that depends on its build), so the outputs agree to one rounding of the output dtype.
    ulp = torch.finfo(dtype).eps * slow_out.float().abs().clamp(min=torch.finfo(dtype).tiny)
    assert torch.all((fast_out.float() - slow_out.float()).abs() <= ulp)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_scale_codes_on_and_beside_every_table_entry_match(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Groups whose range over qmax lands exactly on each log scale entry, or one fp32 step either side: the
    kernels' scale code (from the exponent, no search) equals torch's ``searchsorted``."""
    qmax = 2 ** (8 if name == "int8" else 4) - 1
    steps = torch.cat(
        [
            LOG_SCALE_TABLE,
            torch.nextafter(LOG_SCALE_TABLE, torch.full_like(LOG_SCALE_TABLE, 1e9)),
            torch.nextafter(LOG_SCALE_TABLE, torch.zeros_like(LOG_SCALE_TABLE)),
        ]
    )
    high = (steps * qmax).clamp(max=60000.0)
    groups = high.numel()
    # values grouped per token: one group of 64 per row, its minimum 0 and its maximum ``high``
    kv = torch.zeros(groups, 1, 64)
    kv[:, 0, 1] = high
    fast, slow, _, _ = both_paths(monkeypatch, name, kv, KVKind.VALUE)
    scale_fast, scale_slow = fast[1], slow[1]
    assert torch.equal(scale_fast, scale_slow)
    assert len(set(scale_fast.flatten().tolist())) > 200  # the whole table was exercised


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e6])
@pytest.mark.parametrize("kind", list(KVKind))
def test_kernels_refuse_what_the_torch_path_refuses(
    monkeypatch: pytest.MonkeyPatch, bad: float, kind: KVKind
) -> None:
    kv = torch.randn(130, 2, 64)
    kv[129, 1, 63] = bad
    codec = get_codec("int4", exact_tokens=0)
    with pytest.raises(ValueError) as fast:
        codec.encode(kv, kind)
    with monkeypatch.context() as m:
        torch_only(m)
        with pytest.raises(ValueError) as slow:
            codec.encode(kv, kind)
    assert str(fast.value) == str(slow.value)


def test_without_a_compiler_the_codecs_keep_the_torch_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PDFLOW_NATIVE_CACHE", str(tmp_path / "cache"))
    kv = kv_like((100, 3, 64), torch.bfloat16, seed=1)
    codec = get_codec("int8", exact_tokens=0)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        out = codec.decode(codec.encode(kv, KVKind.KEY))
    assert "using the torch path" in caplog.text
    assert native.library() is None
    assert (out.float() - kv.float()).abs().max() < 0.1  # still a working int8 round trip
