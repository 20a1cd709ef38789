"""``int4``: 4-bit asymmetric codes packed two per byte, a one-byte log scale and an fp16 zero per group
(KIVI layout, see ``affine``).

Code ``2i`` goes in the low nibble of byte ``i``, code ``2i + 1`` in the high nibble; an odd count leaves the
last high nibble zero. Wire: half a byte per element plus 3 bytes per group.
"""

from __future__ import annotations

import sys

import torch

from kv_transfer.codec.affine import AffineCodec
from protocol.kv_config import KVCodecKind

_LITTLE_ENDIAN = sys.byteorder == "little"
"""Packing and unpacking then run on int16 pairs, with no strided pass (several times faster on the CPU)."""


class Int4Codec(AffineCodec):
    """Two codes a byte."""

    name = KVCodecKind.INT4
    bits = 4
    codes_per_byte = 2

    def pack_into(self, codes: torch.Tensor, out: torch.Tensor) -> None:
        whole = torch.empty(out.numel() * 2, dtype=torch.uint8, device=codes.device)
        whole[: codes.numel()] = codes.view(torch.int32)  # the low byte (see ``AffineCodec.pack_into``)
        whole[codes.numel() :] = 0
        if not _LITTLE_ENDIAN:
            torch.add(whole[0::2], whole[1::2], alpha=16, out=out)
            return
        pairs = whole.view(torch.int16)  # code 2i in the low byte, code 2i + 1 in the high byte
        out.copy_(pairs | (pairs >> 4))  # the cast keeps the low byte: code 2i | code 2i + 1 << 4

    def unpack(self, packed: torch.Tensor, count: int) -> torch.Tensor:
        if _LITTLE_ENDIAN:
            wide = packed.to(torch.int16)
            codes = ((wide | (wide << 4)) & 0x0F0F).view(torch.uint8)  # each int16: code 2i, code 2i + 1
        else:
            codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(-1)
        return codes[:count] if codes.numel() != count else codes

    def packed_len(self, count: int) -> int:
        return -(-count // 2)
