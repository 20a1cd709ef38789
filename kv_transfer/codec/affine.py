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
vectorized within each, on views of the whole groups and of the remainder (no padded copy): at a prompt's
size (a few hundred tokens a layer) the cost is the count of passes and calls, not arithmetic. On the CPU,
``native``'s C kernels take over when they could be built: the same bytes in one read of each group.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from kv_transfer.codec import native
from kv_transfer.codec.base import (
    EXACT_TOKENS,
    EncodedKV,
    KVCodec,
    KVHeader,
    KVKind,
    KVPart,
    PartSpec,
    check_exact_tokens,
    check_extremes,
    kv_shape,
)
from kv_transfer.codec.groups import (
    CPU_CHUNK_ELEMENTS,
    DEFAULT_GROUP_SIZE,
    TOKEN_AXIS,
    check_group_size,
    group_rows,
    group_shape,
    kivi_axis,
    token_chunks,
    whole_groups,
)
from kv_transfer.codec.rounding import fp16_round_down, log_scale_up, log_scale_value

ROUNDER = float(2**23)
"""Added to a code in ``[0, 256)`` held in fp32: the sum's last mantissa bits are the rounded code."""


@dataclass(frozen=True)
class AffineCodes:
    """Integer codes packed into bytes (uint8, ``[T, H, D]`` order flattened) and their per-group log scale
    code (uint8) and fp16 zero."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


class AffineCodec(KVCodec):
    """int8 and int4: keys per channel, values per token, ``group_size`` elements a group (default 64).
    Subclasses say how many bits a code has and how codes are packed into bytes."""

    bits: int
    codes_per_byte = 1
    lossless = False
    checks_range = True

    def __init__(self, group_size: int = DEFAULT_GROUP_SIZE, exact_tokens: int = EXACT_TOKENS) -> None:
        self.group_size = check_group_size(group_size, self.name)
        self.exact_tokens = check_exact_tokens(exact_tokens, self.name)

    def pack_into(self, codes: torch.Tensor, out: torch.Tensor) -> None:
        """Flat fp32 codes plus ``ROUNDER`` (see ``_quantize``) into the bytes ``out``. Each is ``2**23 +
        code``, whose fp32 bits end in the code: read as int32, the narrowing keeps that low byte. (fp32 to
        uint8 is a slow cast on the CPU, and a cast to int32 first cost a pass and a fresh tensor.)"""
        out.copy_(codes.view(torch.int32))

    def unpack(self, packed: torch.Tensor, count: int) -> torch.Tensor:
        """The first ``count`` codes of ``packed``, flat, as integers ``torch.addcmul`` takes with fp32."""
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
        q = quantize(kv, kind, self.group_size, self)
        header = KVHeader(self.name, kind, kv_shape(kv), kv.dtype, {"group_size": self.group_size})
        parts = (KVPart("codes", q.codes), KVPart("scale", q.scale), KVPart("zero", q.zero))
        return EncodedKV(header, parts)

    def _decode(self, enc: EncodedKV) -> torch.Tensor:
        q = AffineCodes(enc.part("codes"), enc.part("scale"), enc.part("zero"))
        return dequantize(q, enc.header, enc.header.param("group_size"), self)


def scale_shape(header: KVHeader, group_size: int) -> tuple[int, int, int]:
    """Shape of the scale and zero parts for a payload with this header."""
    return group_shape(header.shape, kivi_axis(header.kind), group_size)


def quantize(kv: torch.Tensor, kind: KVKind, group_size: int, codec: AffineCodec) -> AffineCodes:
    """Codes, packed as ``codec`` packs them, with their scales and zero points; ``ValueError`` (naming the
    codec) on inf, NaN or a magnitude past fp16's range."""
    axis = kivi_axis(kind)
    shape = group_shape(kv_shape(kv), axis, group_size)
    per_token = kv.shape[1] * kv.shape[2]
    codes = torch.empty(codec.packed_len(kv.numel()), dtype=torch.uint8, device=kv.device)
    scale = torch.empty(shape, dtype=torch.uint8, device=kv.device)
    zero = torch.empty(shape, dtype=torch.float16, device=kv.device)
    if native.usable(kv):  # the same bytes, in one read of the input
        low, high = native.encode(kv, axis == TOKEN_AXIS, group_size, codec.bits, codes, scale, zero)
        check_extremes(low, high, codec.name)
        return AffineCodes(codes, scale, zero)
    for tokens in _chunks(kv, axis, group_size, codec):
        rows = group_rows(tokens, axis, group_size)
        q, scale[rows], zero[rows] = _quantize(
            kv[tokens], axis, group_size, float(2**codec.bits - 1), codec.name
        )
        first = tokens.start * per_token // codec.codes_per_byte
        codec.pack_into(q.view(-1), codes[first : first + codec.packed_len(q.numel())])
    return AffineCodes(codes, scale, zero)


def dequantize(q: AffineCodes, header: KVHeader, group_size: int, codec: AffineCodec) -> torch.Tensor:
    axis = kivi_axis(header.kind)
    out = torch.empty(header.shape, dtype=header.dtype, device=q.codes.device)
    if native.usable(out, q.codes, q.scale, q.zero):
        native.decode(out, axis == TOKEN_AXIS, group_size, codec.bits, q.codes, q.scale, q.zero)
        return out
    per_token = header.shape[1] * header.shape[2]
    for tokens in _chunks(out, axis, group_size, codec):
        rows = group_rows(tokens, axis, group_size)
        first, count = (
            tokens.start * per_token // codec.codes_per_byte,
            (tokens.stop - tokens.start) * per_token,
        )
        target = out[tokens]
        codes = codec.unpack(q.codes[first : first + codec.packed_len(count)], count).view(target.shape)
        zero, scale = q.zero[rows].float(), log_scale_value(q.scale[rows])
        # into fp32 scratch, then one rounding copy: an fp32 sum stored into a bf16 ``out`` made torch
        # allocate an fp32 temporary of its own each time
        work = _scratch(target.shape) if target.is_cpu and target.dtype != torch.float32 else target
        (codes_main, codes_tail), (out_main, out_tail) = (
            whole_groups(t, axis, group_size) for t in (codes, work)
        )
        whole = codes_main.shape[axis] if codes_main is not None else 0
        if codes_main is not None and out_main is not None:  # computed in fp32, rounded once into ``out``
            torch.addcmul(
                zero.narrow(axis, 0, whole).unsqueeze(axis + 1),
                codes_main,
                scale.narrow(axis, 0, whole).unsqueeze(axis + 1),
                out=out_main,
            )
        if codes_tail is not None and out_tail is not None:
            torch.addcmul(zero.narrow(axis, whole, 1), codes_tail, scale.narrow(axis, whole, 1), out=out_tail)
        if work is not target:
            target.copy_(work)
    return out


def _chunks(kv: torch.Tensor, axis: int, group_size: int, codec: AffineCodec) -> list[slice]:
    """Token chunks (see ``token_chunks``) whose codes start on a byte: one chunk when a token's codes do
    not fill whole bytes."""
    if (kv.shape[1] * kv.shape[2]) % codec.codes_per_byte:
        return [slice(0, kv.shape[0])]
    return token_chunks(kv, group_size if axis == TOKEN_AXIS else 1)


_SCRATCH = threading.local()


def _scratch(shape: torch.Size) -> torch.Tensor:
    """An fp32 tensor of ``shape`` in this thread's CPU scratch buffer, kept from call to call: a fresh
    2 MB tensor a chunk could cost more in page faults than the arithmetic (SmolLM2, 512 tokens, five
    layers a call, 30 layers: int8 encoded in 21 ms against 8 ms, and decoded in 4.5 to 23 ms, depending
    on what glibc had kept). Whoever takes it is done with it before the thread's next call here."""
    count = math.prod(shape)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < count:
        buf = _SCRATCH.buf = torch.empty(max(count, CPU_CHUNK_ELEMENTS), dtype=torch.float32)
    return buf[:count].view(shape)


def _working_copy(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, to be coded in place (on the CPU, in ``_scratch``)."""
    if x.device.type != "cpu":
        return x.float() if x.dtype != torch.float32 else x.clone()
    return _scratch(x.shape).copy_(x)


def _quantize(
    x: torch.Tensor, axis: int, group_size: int, qmax: float, codec: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 codes plus ``ROUNDER`` (``x``'s shape; ``pack_into`` keeps their low byte), log scale codes
    and fp16 zeros of one chunk. ``x`` is widened to fp32 once (bf16 reductions are several times slower)
    and coded in place there; the whole groups are views and the remainder is reduced on its own, so
    nothing is padded or copied again."""
    q = _working_copy(x)
    main, tail = whole_groups(q, axis, group_size)  # keys [G, g, H, D], values [T, H, G, g]
    lows, highs = [], []
    if main is not None:  # amin and amax: far faster than aminmax along a dim
        lows.append(main.amin(dim=axis + 1))
        highs.append(main.amax(dim=axis + 1))
    if tail is not None:
        lows.append(tail.amin(dim=axis, keepdim=True))
        highs.append(tail.amax(dim=axis, keepdim=True))
    low, high = (torch.cat(t, dim=axis) if len(t) > 1 else t[0] for t in (lows, highs))
    check_extremes(float(low.min()), float(high.max()), codec)
    zero = fp16_round_down(low)
    zero32 = zero.float()
    scale = log_scale_up((high - zero32) / qmax)
    inverse = log_scale_value(scale).reciprocal_()
    whole = main.shape[axis] if main is not None else 0
    if main is not None:
        main.sub_(zero32.narrow(axis, 0, whole).unsqueeze(axis + 1))
        main.mul_(inverse.narrow(axis, 0, whole).unsqueeze(axis + 1))
    if tail is not None:
        tail.sub_(zero32.narrow(axis, whole, 1))
        tail.mul_(inverse.narrow(axis, whole, 1))
    # (x - zero) * inverse is in [0, qmax], past qmax by a rounding error at most: adding ROUNDER rounds
    # it to the nearest integer, ties to even, in the same pass (fp32 has no bits left below 1 there)
    return q.add_(ROUNDER), scale, zero
