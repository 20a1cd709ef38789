"""KV codecs: pure functions that turn one layer's K or V for a block range (``[num_tokens, num_kv_heads,
head_dim]``, bf16/fp16/fp32, CPU or GPU) into a small header plus named contiguous payload parts ready to be
copied into registered NIXL buffers, and back.

This package owns the wire format of a KV payload (``KVHeader``, ``EncodedKV``, ``PartSpec``), the codecs
(``none``, ``lossless``, ``fp8``, ``int8``, ``int4``) and their input and payload checks. It moves nothing and
decides nothing: the transport moves the parts, the policy picks the codec. Imports torch only (and zstandard
for ``lossless``).
"""

from __future__ import annotations

from kv_transfer.codec.base import (
    FP16_MAX,
    SUPPORTED_DTYPES,
    EncodedKV,
    KVCodec,
    KVHeader,
    KVKind,
    KVPart,
    PartSpec,
)
from kv_transfer.codec.fp8 import Fp8Codec
from kv_transfer.codec.groups import DEFAULT_GROUP_SIZE
from kv_transfer.codec.int4 import Int4Codec
from kv_transfer.codec.int8 import Int8Codec
from kv_transfer.codec.lossless import LosslessCodec
from kv_transfer.codec.none import NoneCodec
from kv_transfer.codec.registry import CODEC_NAMES, get_codec

__all__ = [
    "CODEC_NAMES",
    "DEFAULT_GROUP_SIZE",
    "FP16_MAX",
    "SUPPORTED_DTYPES",
    "EncodedKV",
    "Fp8Codec",
    "Int4Codec",
    "Int8Codec",
    "KVCodec",
    "KVHeader",
    "KVKind",
    "KVPart",
    "LosslessCodec",
    "NoneCodec",
    "PartSpec",
    "get_codec",
]
