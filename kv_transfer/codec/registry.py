"""Codecs by name: the names a config or a transfer header uses, and ``get_codec`` to build one."""

from __future__ import annotations

from collections.abc import Callable

from kv_transfer.codec.base import KVCodec
from kv_transfer.codec.fp8 import Fp8Codec
from kv_transfer.codec.int4 import Int4Codec
from kv_transfer.codec.int8 import Int8Codec
from kv_transfer.codec.lossless import LosslessCodec
from kv_transfer.codec.none import NoneCodec
from protocol.kv_config import KVCodecKind

_FACTORIES: dict[KVCodecKind, Callable[..., KVCodec]] = {
    NoneCodec.name: NoneCodec,
    LosslessCodec.name: LosslessCodec,
    Fp8Codec.name: Fp8Codec,
    Int8Codec.name: Int8Codec,
    Int4Codec.name: Int4Codec,
}

CODEC_NAMES: tuple[KVCodecKind, ...] = tuple(_FACTORIES)
"""Every codec name, from the most faithful to the smallest on the wire."""


def get_codec(name: KVCodecKind | str, **options: int) -> KVCodec:
    """The codec called ``name`` with its options (``group_size`` for fp8, int8 and int4).

    Raises ``ValueError`` naming the valid codecs for an unknown name, and for an option the codec does not
    take.
    """
    factory = _FACTORIES.get(name)  # type: ignore[arg-type]  # a string names a codec as its enum does
    if factory is None:
        raise ValueError(f"unknown KV codec {name!r}; valid codecs: {', '.join(CODEC_NAMES)}")
    try:
        return factory(**options)
    except TypeError as exc:
        raise ValueError(f"KV codec {name!r} does not take options {sorted(options)}: {exc}") from exc
