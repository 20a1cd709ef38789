"""``int4``: 4-bit asymmetric codes packed two per byte, a one-byte log scale and an fp16 zero per group
(KIVI layout, see ``affine``).

Code ``2i`` goes in the low nibble of byte ``i``, code ``2i + 1`` in the high nibble; an odd count leaves the
last high nibble zero. Wire: half a byte per element plus 3 bytes per group.
"""

from __future__ import annotations

import torch

from kv_transfer.codec.affine import AffineCodec


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


class Int4Codec(AffineCodec):
    """Two codes a byte."""

    name = "int4"
    bits = 4

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_nibbles(codes)

    def unpack(self, packed: torch.Tensor, count: int) -> torch.Tensor:
        return unpack_nibbles(packed, count)

    def packed_len(self, count: int) -> int:
        return -(-count // 2)
