"""``int8``: 8-bit asymmetric codes, a one-byte log scale and an fp16 zero per group (KIVI layout, see
``affine``).

Wire: 1 byte per element plus 3 bytes per group.
"""

from __future__ import annotations

from kv_transfer.codec.affine import AffineCodec
from protocol.kv_config import KVCodecKind


class Int8Codec(AffineCodec):
    """One byte a code."""

    name = KVCodecKind.INT8
    bits = 8
