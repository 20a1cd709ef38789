"""``int4``: 4-bit asymmetric codes packed two per byte, a one-byte log scale and an fp16 zero per group
(KIVI layout, see ``affine``).

Code ``2i`` goes in the low nibble of byte ``i``, code ``2i + 1`` in the high nibble; an odd count leaves the
last high nibble zero. Wire: half a byte per element plus 3 bytes per group.
"""

from __future__ import annotations

import math

import torch

from kv_transfer.codec.affine import AffineCodes, dequantize, quantize, scale_shape
from kv_transfer.codec.base import EncodedKV, KVCodec, KVHeader, KVKind, KVPart, PartSpec, kv_shape
from kv_transfer.codec.groups import DEFAULT_GROUP_SIZE, check_group_size


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Flat uint8 codes in 0..15 to ``ceil(n / 2)`` bytes."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: the first ``count`` codes."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(-1)
    return codes[:count] if codes.numel() != count else codes


class Int4Codec(KVCodec):
    """Keys per channel, values per token, ``group_size`` elements per group (default 64)."""

    name = "int4"
    lossless = False

    def __init__(self, group_size: int = DEFAULT_GROUP_SIZE) -> None:
        self.group_size = check_group_size(group_size, self.name)

    def part_specs(self, header: KVHeader) -> tuple[PartSpec, ...]:
        group_size = check_group_size(header.param("group_size"), f"{self.name} header")
        groups = scale_shape(header, group_size)
        return (
            PartSpec("codes", torch.uint8, (-(-math.prod(header.shape) // 2),)),
            PartSpec("scale", torch.uint8, groups),
            PartSpec("zero", torch.float16, groups),
        )

    def _encode(self, kv: torch.Tensor, kind: KVKind) -> EncodedKV:
        q = quantize(kv, kind, self.group_size, bits=4)
        header = KVHeader(self.name, kind, kv_shape(kv), kv.dtype, {"group_size": self.group_size})
        parts = (KVPart("codes", pack_nibbles(q.codes)), KVPart("scale", q.scale), KVPart("zero", q.zero))
        return EncodedKV(header, parts)

    def _decode(self, enc: EncodedKV) -> torch.Tensor:
        codes = unpack_nibbles(enc.part("codes"), math.prod(enc.shape))
        q = AffineCodes(codes, enc.part("scale"), enc.part("zero"))
        return dequantize(q, enc.header, enc.header.param("group_size"))
