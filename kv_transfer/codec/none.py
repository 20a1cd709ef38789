"""``none``: the tensor's own bytes, one ``uint8`` part, zero-copy for contiguous input both ways."""

from __future__ import annotations

import torch

from kv_transfer.codec.base import EncodedKV, KVCodec, KVHeader, KVKind, KVPart, PartSpec, kv_shape
from protocol.kv_config import KVCodecKind


class NoneCodec(KVCodec):
    """Raw bytes. The part is a view of the input, so the caller must not modify ``kv`` until it is sent;
    the decoded tensor is a view of the received part, so the receiver copies it out before reusing the
    buffer."""

    name = KVCodecKind.NONE
    lossless = True

    def _part_specs(self, header: KVHeader) -> tuple[PartSpec, ...]:
        return (PartSpec("raw", torch.uint8, (header.raw_nbytes,)),)

    def _encode(self, kv: torch.Tensor, kind: KVKind) -> EncodedKV:
        header = KVHeader(self.name, kind, kv_shape(kv), kv.dtype)
        return EncodedKV(header, (KVPart("raw", kv.view(-1).view(torch.uint8)),))

    def _decode(self, enc: EncodedKV) -> torch.Tensor:
        return enc.part("raw").view(enc.dtype).view(enc.shape)
