"""KV tensors for codec tests, and the error bounds a lossy codec's payload implies from its own scales."""

from __future__ import annotations

import torch

from kv_transfer.codec import (
    EncodedKV,
    KVKind,
    get_codec,
)
from kv_transfer.codec.rounding import log_scale_value

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
LOSSY = ["fp8", "int8", "int4"]
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}
E4M3_HALF_STEP = 2.0**-4  # e4m3 keeps 3 mantissa bits: rounding is within half a step, 2^-4 of the magnitude
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10  # below 2^-6 the step is 2^-9 of the scale


def kv_like(shape: tuple[int, int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Normal data with per-channel spread and offsets, the structure real keys have (outlier channels)."""
    gen = torch.Generator().manual_seed(seed)
    _, heads, head_dim = shape
    spread = torch.rand(1, heads, head_dim, generator=gen) * 2 + 0.05
    offset = torch.randn(1, heads, head_dim, generator=gen) * 2
    return (torch.randn(shape, generator=gen) * spread + offset).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def roundtrip(name: str, kv: torch.Tensor, kind: KVKind, **options: int) -> tuple[EncodedKV, torch.Tensor]:
    """Encode and decode; a lossy codec keeps no token exact unless ``exact_tokens`` says so, so that the
    quantizer's bounds apply to every element (the exact lead has tests of its own)."""
    if name in LOSSY:
        options.setdefault("exact_tokens", 0)
    codec = get_codec(name, **options)
    enc = codec.encode(kv, kind)
    return enc, codec.decode(enc)


def half_ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` at ``|v|``: the most the cast to the output dtype can move a value."""
    _, exponent = torch.frexp(v.abs().float())
    finfo = torch.finfo(dtype)
    return torch.ldexp(
        torch.ones_like(v, dtype=torch.float32), exponent - 2 - MANTISSA_BITS[dtype]
    ).clamp_min(finfo.smallest_normal * finfo.eps / 2)


def per_element(enc: EncodedKV, name: str, per_channel: bool) -> torch.Tensor:
    """A per-group part (scale or zero, as the fp32 values it stands for) broadcast back to ``[T, H, D]``."""
    group_size = enc.header.params["group_size"]
    tokens, _, head_dim = enc.shape
    part = enc.part(name)
    groups = log_scale_value(part) if part.dtype == torch.uint8 else part.float()
    if per_channel:  # keys of int8/int4: [G, H, D], groups of consecutive tokens
        return groups.repeat_interleave(group_size, dim=0)[:tokens]
    return groups.repeat_interleave(group_size, dim=-1)[..., :head_dim]  # [T, H, G] along head_dim


def error_bound(name: str, enc: EncodedKV, kv: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The documented per-element bound from the payload's own scales, plus the output cast and fp32 slack."""
    x = kv.float()
    per_channel = name != "fp8" and enc.kind is KVKind.KEY
    scale = per_element(enc, "scale", per_channel)
    coded = x - per_element(enc, "center", True) if name == "fp8" and enc.kind is KVKind.KEY else x
    fp8_bound = E4M3_HALF_STEP * coded.abs() + E4M3_SUBNORMAL_HALF_STEP * scale  # relative, or subnormal
    core = fp8_bound if name == "fp8" else scale / 2  # int8/int4: half an integer step
    cast = half_ulp(torch.maximum(x.abs(), out.float().abs()), kv.dtype)
    return core + cast + 2.0**-20 * x.abs() + 1e-4 * scale  # fp32 rounding: a few ulps of qmax in code units


def assert_within_bound(name: str, kv: torch.Tensor, kind: KVKind, **options: int) -> float:
    enc, out = roundtrip(name, kv, kind, **options)
    assert out.shape == kv.shape and out.dtype == kv.dtype
    err = (out.float() - kv.float()).abs()
    bound = error_bound(name, enc, kv, out)
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{name} {kind}: error exceeds its bound by {worst:.3f}x"
    return worst
