"""``int8``: 8-bit asymmetric codes, a one-byte log scale and an fp16 zero per group (KIVI layout, see
``affine``).

Wire: 1 byte per element plus 3 bytes per group.
"""

from __future__ import annotations

import math

import torch

from kv_transfer.codec.affine import AffineCodes, dequantize, quantize, scale_shape
from kv_transfer.codec.base import EncodedKV, KVCodec, KVHeader, KVKind, KVPart, PartSpec, kv_shape
from kv_transfer.codec.groups import DEFAULT_GROUP_SIZE, check_group_size


class Int8Codec(KVCodec):
    """Keys per channel, values per token, ``group_size`` elements per group (default 64)."""

    name = "int8"
    lossless = False

    def __init__(self, group_size: int = DEFAULT_GROUP_SIZE) -> None:
        self.group_size = check_group_size(group_size, self.name)

    def part_specs(self, header: KVHeader) -> tuple[PartSpec, ...]:
        group_size = check_group_size(header.param("group_size"), f"{self.name} header")
        groups = scale_shape(header, group_size)
        return (
            PartSpec("codes", torch.uint8, (math.prod(header.shape),)),
            PartSpec("scale", torch.uint8, groups),
            PartSpec("zero", torch.float16, groups),
        )

    def _encode(self, kv: torch.Tensor, kind: KVKind) -> EncodedKV:
        q = quantize(kv, kind, self.group_size, bits=8)
        header = KVHeader(self.name, kind, kv_shape(kv), kv.dtype, {"group_size": self.group_size})
        parts = (KVPart("codes", q.codes), KVPart("scale", q.scale), KVPart("zero", q.zero))
        return EncodedKV(header, parts)

    def _decode(self, enc: EncodedKV) -> torch.Tensor:
        q = AffineCodes(enc.part("codes"), enc.part("scale"), enc.part("zero"))
        return dequantize(q, enc.header, enc.header.param("group_size"))
