"""Asymmetric per-group integer quantization in the KIVI/HACK layout, shared by ``int8`` and ``int4``.

Keys are grouped per channel (along tokens, for each head and channel), values per token (along
``head_dim``); see ``groups``. Each group stores an fp16 zero point (its minimum, rounded down) and a
one-byte log scale code (its range over ``qmax = 2**bits - 1``, rounded up; see ``rounding``), and each
element the integer
``q = round((x - zero) / scale)``. The directed rounding keeps every element inside
``[zero, zero + qmax * scale]``, so ``|x - (zero + q * scale)| <= scale / 2`` holds for the stored scale,
before the final rounding to the output dtype. ``x - zero`` is formed before scaling: a channel with a large
offset and a small range would lose its codes to cancellation in ``x / scale - zero / scale``.

Codes keep the input's ``[T, H, D]`` order, flattened; scale and zero are ``[G, H, D]`` for keys and
``[T, H, G]`` for values, 3 bytes a group on the wire. Work runs in token chunks (``groups.token_chunks``),
vectorized within each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kv_transfer.codec.base import (
    EXACT_TOKENS,
    EncodedKV,
    KVCodec,
    KVHeader,
    KVKind,
    KVPart,
    PartSpec,
    check_exact_tokens,
    kv_shape,
)
from kv_transfer.codec.groups import (
    DEFAULT_GROUP_SIZE,
    check_group_size,
    group_rows,
    group_shape,
    kivi_axis,
    merge_groups,
    split_groups,
    token_chunks,
)
from kv_transfer.codec.rounding import fp16_round_down, log_scale_up, log_scale_value


@dataclass(frozen=True)
class AffineCodes:
    """Unpacked integer codes (uint8, ``[T, H, D]`` flattened) and their per-group log scale code (uint8) and
    fp16 zero."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


class AffineCodec(KVCodec):
    """int8 and int4: keys per channel, values per token, ``group_size`` elements a group (default 64).
    Subclasses say how many bits a code has and how codes are packed into bytes."""

    bits: int
    lossless = False

    def __init__(self, group_size: int = DEFAULT_GROUP_SIZE, exact_tokens: int = EXACT_TOKENS) -> None:
        self.group_size = check_group_size(group_size, self.name)
        self.exact_tokens = check_exact_tokens(exact_tokens, self.name)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return codes

    def unpack(self, packed: torch.Tensor, count: int) -> torch.Tensor:
        return packed

    def packed_len(self, count: int) -> int:
        return count

    def _part_specs(self, header: KVHeader) -> tuple[PartSpec, ...]:
        group_size = check_group_size(header.param("group_size"), f"{self.name} header")
        groups = scale_shape(header, group_size)
        return (
            PartSpec("codes", torch.uint8, (self.packed_len(math.prod(header.shape)),)),
            PartSpec("scale", torch.uint8, groups),
            PartSpec("zero", torch.float16, groups),
        )

    def _encode(self, kv: torch.Tensor, kind: KVKind) -> EncodedKV:
        q = quantize(kv, kind, self.group_size, bits=self.bits)
        header = KVHeader(self.name, kind, kv_shape(kv), kv.dtype, {"group_size": self.group_size})
        parts = (KVPart("codes", self.pack(q.codes)), KVPart("scale", q.scale), KVPart("zero", q.zero))
        return EncodedKV(header, parts)

    def _decode(self, enc: EncodedKV) -> torch.Tensor:
        codes = self.unpack(enc.part("codes"), math.prod(enc.shape))
        q = AffineCodes(codes, enc.part("scale"), enc.part("zero"))
        return dequantize(q, enc.header, enc.header.param("group_size"))


def scale_shape(header: KVHeader, group_size: int) -> tuple[int, int, int]:
    """Shape of the scale and zero parts for a payload with this header."""
    return group_shape(header.shape, kivi_axis(header.kind), group_size)


def quantize(kv: torch.Tensor, kind: KVKind, group_size: int, bits: int) -> AffineCodes:
    axis = kivi_axis(kind)
    shape = group_shape((kv.shape[0], kv.shape[1], kv.shape[2]), axis, group_size)
    codes = torch.empty(kv.shape, dtype=torch.uint8, device=kv.device)
    scale = torch.empty(shape, dtype=torch.uint8, device=kv.device)
    zero = torch.empty(shape, dtype=torch.float16, device=kv.device)
    for tokens in token_chunks(kv, group_size if axis == 0 else 1):
        rows = group_rows(tokens, axis, group_size)
        codes[tokens], scale[rows], zero[rows] = _quantize(kv[tokens], axis, group_size, float(2**bits - 1))
    return AffineCodes(codes.view(-1), scale, zero)


def dequantize(q: AffineCodes, header: KVHeader, group_size: int) -> torch.Tensor:
    axis = kivi_axis(header.kind)
    codes = q.codes.view(header.shape)
    out = torch.empty(header.shape, dtype=header.dtype, device=codes.device)
    for tokens in token_chunks(codes, group_size if axis == 0 else 1):
        rows = group_rows(tokens, axis, group_size)
        chunk = split_groups(codes[tokens].float(), axis, group_size, zero_pad=True)
        zero = q.zero[rows].float().unsqueeze(axis + 1)
        groups = torch.addcmul(zero, chunk, log_scale_value(q.scale[rows]).unsqueeze(axis + 1))
        out[tokens] = merge_groups(groups, axis, out[tokens].shape[axis])
    return out


def _quantize(
    kv: torch.Tensor, axis: int, group_size: int, qmax: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups = split_groups(kv.float(), axis, group_size)  # keys [G, g, H, D], values [T, H, G, g]
    low, high = groups.amin(dim=axis + 1), groups.amax(dim=axis + 1)  # far faster than aminmax along a dim
    zero = fp16_round_down(low)
    zero32 = zero.float()
    scale = log_scale_up((high - zero32) / qmax)
    q = groups - zero32.unsqueeze(axis + 1)
    q.mul_(log_scale_value(scale).reciprocal_().unsqueeze(axis + 1)).round_().clamp_(0.0, qmax)
    return merge_groups(q, axis, kv.shape[axis]).to(torch.uint8), scale, zero
