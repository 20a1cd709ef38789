"""The codec contract: what goes in (one layer's K or V for a block range), what comes out (a small header
plus named contiguous payload parts), and the checks both sides run.

Wire layout. An ``EncodedKV`` is a ``KVHeader`` (a handful of scalars: codec, kind, shape, dtype and
integer ``params``) plus ``parts``, each one contiguous tensor. The header travels on the control plane; the
parts are what the transport moves. ``KVCodec.part_specs(header)`` says, from the header alone, the name,
dtype and shape of every part, so a receiver can carve exactly those byte ranges out of a registered NIXL
buffer before any payload arrives, and the sender can ``copy_`` each ``part.data.view(torch.uint8)`` into its
own registered buffer. ``decode`` checks the parts it is handed against ``part_specs`` and raises
``ValueError`` on any difference: the decode side never trusts a size it did not expect.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

import torch

from protocol.kv_config import KVCodecKind

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)
"""Input dtypes every codec accepts: the KV cache dtypes vLLM uses (bf16, fp16) and fp32."""

FP16_MAX = 65504.0
"""Largest magnitude a lossy codec accepts: its scales and zero points are stored as fp16."""

EXACT_TOKENS = 1
"""Leading tokens a lossy codec keeps exact by default. The first token of a prompt is the attention sink:
every later query attends to it heavily, and its keys and values are outliers that would also widen the
quantization groups they share with the tokens after it. Measured on SmolLM2-135M with 60 prompts
(teacher-forced greedy agreement with the exact KV, ``benchmarks/kv_quality.py``): int4 94.3% -> 96.9%, int8
98.1% -> 98.3%, fp8 97.4% -> 97.8%, for one raw token per layer on the wire."""
LEAD = "exact_tokens"  # header param: how many leading tokens travel raw in the ``lead`` part


class KVKind(enum.Enum):
    """Which half of a layer's cache a tensor holds; KIVI-style codecs group keys and values differently."""

    KEY = "key"
    VALUE = "value"


@dataclass(frozen=True)
class PartSpec:
    """What one payload part must look like: known from the header alone, before the bytes arrive."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class KVPart:
    """One named payload part; ``data`` is contiguous, on the device the codec ran on (lossless: CPU)."""

    name: str
    data: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


@dataclass(frozen=True)
class KVHeader:
    """Everything the decode side needs besides the payload: small, sent on the control plane."""

    codec: KVCodecKind
    kind: KVKind
    shape: tuple[int, int, int]
    """Original ``[num_tokens, num_kv_heads, head_dim]``."""
    dtype: torch.dtype
    """Original dtype, restored by ``decode``."""
    params: Mapping[str, int] = field(default_factory=dict)
    """Codec-specific integers (group size, compressed plane sizes); read-only."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "codec", KVCodecKind(self.codec))
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    @property
    def raw_nbytes(self) -> int:
        """Bytes of the original tensor."""
        return math.prod(self.shape) * self.dtype.itemsize

    def param(self, name: str) -> int:
        """A required integer parameter; a missing one means a malformed header."""
        value = self.params.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{self.codec} header: parameter {name!r} missing or not an int (got {value!r})")
        return value


@dataclass(frozen=True)
class EncodedKV:
    """One encoded K or V tensor: a header and the named contiguous parts the transport moves."""

    header: KVHeader
    parts: tuple[KVPart, ...]

    @property
    def codec(self) -> str:
        return self.header.codec

    @property
    def kind(self) -> KVKind:
        return self.header.kind

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.header.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.header.dtype

    @property
    def nbytes(self) -> int:
        """Payload bytes on the wire (the header is a few dozen bytes more, sent separately)."""
        return sum(part.nbytes for part in self.parts)

    @property
    def ratio(self) -> float:
        """Wire bytes over the original tensor's bytes."""
        return self.nbytes / self.header.raw_nbytes

    def part(self, name: str) -> torch.Tensor:
        for part in self.parts:
            if part.name == name:
                return part.data
        raise ValueError(f"{self.codec}: no part named {name!r} (have {[p.name for p in self.parts]})")


class KVCodec(ABC):
    """Turns one layer's K or V, ``[num_tokens, num_kv_heads, head_dim]`` in bf16, fp16 or fp32, into an
    ``EncodedKV`` and back. Pure and stateless apart from its options: safe to share between threads, never
    blocks on anything but compute. ``decode(encode(kv, kind))`` has ``kv``'s exact shape and dtype; it is
    bitwise equal to ``kv`` when ``lossless`` is true.

    Decoding reads every option it needs (group size, sizes) from the header, never from ``self``, so a
    receiver configured differently from the sender still decodes correctly.
    """

    name: ClassVar[KVCodecKind]
    lossless: ClassVar[bool]

    exact_tokens: int = 0
    """Leading tokens sent raw, untouched by the codec (lossy codecs: ``EXACT_TOKENS`` unless told)."""

    checks_range: ClassVar[bool] = False
    """A lossy codec whose ``_encode`` finds every group's extremes anyway and checks them itself
    (``check_extremes``), sparing ``encode`` a pass over the whole tensor."""

    @property
    def compresses(self) -> bool:
        """Whether encoding changes the bytes (``KVCodecKind.compresses``)."""
        return self.name.compresses

    def encode(self, kv: torch.Tensor, kind: KVKind) -> EncodedKV:
        """Encode ``kv``; raises ``ValueError`` on a wrong kind, rank, dtype, an empty tensor and, for the
        lossy codecs, inf, NaN or a magnitude past fp16's range. The first ``exact_tokens`` tokens travel
        raw in a ``lead`` part and the codec encodes the rest, as if they were all there was."""
        if not isinstance(kind, KVKind):
            raise ValueError(f"{self.name}: kind must be a KVKind, got {kind!r}")
        check_kv(kv, self.name, lossy=not self.lossless and not self.checks_range)
        kv = kv.contiguous()
        lead = min(self.exact_tokens, kv.shape[0])
        if self.checks_range and lead:  # the lead travels raw: the codec never sees it
            check_kv(kv[:lead], self.name, lossy=True)
        if not lead:
            return self._encode(kv, kind)
        parts: tuple[KVPart, ...] = (KVPart("lead", kv[:lead].reshape(-1).view(torch.uint8)),)
        params: dict[str, int] = {}
        if lead < kv.shape[0]:
            rest = self._encode(kv[lead:], kind)
            parts, params = parts + rest.parts, dict(rest.header.params)
        return EncodedKV(KVHeader(self.name, kind, kv_shape(kv), kv.dtype, {**params, LEAD: lead}), parts)

    def decode(self, enc: EncodedKV) -> torch.Tensor:
        """Rebuild the tensor on the parts' device; raises ``ValueError`` if the header or any part is not
        what this codec would have produced."""
        check_header(enc.header, self.name)
        check_parts(enc, self.part_specs(enc.header))
        lead = enc.header.params.get(LEAD, 0)
        if not lead:
            out = self._decode(enc)
        else:
            head = enc.parts[0].data.view(enc.dtype).view(lead, *enc.shape[1:])
            if lead == enc.shape[0]:
                out = head.clone()
            else:
                rest = self._decode(EncodedKV(_rest_header(enc.header, lead), enc.parts[1:]))
                out = torch.cat([head.to(rest.device), rest])
        if tuple(out.shape) != enc.shape or out.dtype != enc.dtype:  # a codec bug, not bad input
            raise AssertionError(f"{self.name}: decoded {tuple(out.shape)} {out.dtype}, header {enc.shape}")
        return out

    def part_specs(self, header: KVHeader) -> tuple[PartSpec, ...]:
        """The parts an ``EncodedKV`` with this header carries, in order; ``ValueError`` on a bad header."""
        lead = header.params.get(LEAD, 0)
        if not lead:
            return self._part_specs(header)
        if not isinstance(lead, int) or isinstance(lead, bool) or not 0 < lead <= header.shape[0]:
            raise ValueError(f"{self.name} header: {LEAD} must be 1..{header.shape[0]}, got {lead!r}")
        tokens, heads, head_dim = header.shape
        specs = (PartSpec("lead", torch.uint8, (lead * heads * head_dim * header.dtype.itemsize,)),)
        return specs + (self._part_specs(_rest_header(header, lead)) if lead < tokens else ())

    @abstractmethod
    def _part_specs(self, header: KVHeader) -> tuple[PartSpec, ...]:
        """The codec's own parts for a header with no raw lead."""

    @abstractmethod
    def _encode(self, kv: torch.Tensor, kind: KVKind) -> EncodedKV:
        """``kv`` is checked and contiguous."""

    @abstractmethod
    def _decode(self, enc: EncodedKV) -> torch.Tensor:
        """``enc`` is checked against ``part_specs``."""


def check_exact_tokens(exact_tokens: object, codec: str) -> int:
    if not isinstance(exact_tokens, int) or isinstance(exact_tokens, bool) or exact_tokens < 0:
        raise ValueError(f"{codec}: exact_tokens must be a non-negative int, got {exact_tokens!r}")
    return exact_tokens


def _rest_header(header: KVHeader, lead: int) -> KVHeader:
    """The header of what follows a raw lead of ``lead`` tokens: the codec's own payload."""
    params = {k: v for k, v in header.params.items() if k != LEAD}
    tokens, heads, head_dim = header.shape
    return KVHeader(header.codec, header.kind, (tokens - lead, heads, head_dim), header.dtype, params)


def check_kv(kv: object, codec: str, *, lossy: bool) -> None:
    """Reject anything a codec cannot encode faithfully, with a message naming the codec and the problem."""
    if not isinstance(kv, torch.Tensor):
        raise ValueError(f"{codec}: kv must be a torch.Tensor, got {type(kv).__name__}")
    if kv.dim() != 3:
        raise ValueError(
            f"{codec}: kv must be [num_tokens, num_kv_heads, head_dim] (3 dims), got shape {tuple(kv.shape)}"
        )
    if kv.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{codec}: kv dtype {kv.dtype} not supported; use one of {list(SUPPORTED_DTYPES)}")
    if kv.numel() == 0:
        raise ValueError(f"{codec}: kv is empty (shape {tuple(kv.shape)})")
    if lossy:
        low, high = torch.aminmax(kv)  # NaN propagates; one pass, no temporary
        check_extremes(float(low), float(high), codec)


def check_extremes(low: float, high: float, codec: str) -> None:
    """A lossy codec's input, known by its smallest and largest element: finite, within fp16's range."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{codec}: kv contains inf or NaN, which a lossy codec cannot represent")
    amax = max(-low, high)
    if amax > FP16_MAX:
        raise ValueError(f"{codec}: kv has |x| = {amax:g} > {FP16_MAX:g}, past the range of fp16 scales")


def kv_shape(kv: torch.Tensor) -> tuple[int, int, int]:
    """``kv.shape`` as the header's ``(num_tokens, num_kv_heads, head_dim)``."""
    tokens, heads, head_dim = kv.shape
    return (int(tokens), int(heads), int(head_dim))


def check_header(header: KVHeader, codec: str) -> None:
    """The fields every codec relies on; codec-specific params are checked by ``part_specs``."""
    if header.codec != codec:
        raise ValueError(f"{codec}: cannot decode a payload encoded with codec {header.codec!r}")
    if not isinstance(header.kind, KVKind):
        raise ValueError(f"{codec} header: kind must be a KVKind, got {header.kind!r}")
    shape = header.shape
    if len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ValueError(f"{codec} header: shape must be 3 positive ints, got {shape!r}")
    if header.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{codec} header: dtype {header.dtype} not supported")


def check_parts(enc: EncodedKV, specs: tuple[PartSpec, ...]) -> None:
    """Every part present, in order, with exactly the expected dtype and shape, contiguous."""
    names = [part.name for part in enc.parts]
    expected = [spec.name for spec in specs]
    if names != expected:
        raise ValueError(f"{enc.codec} decode: parts {names}, header expects {expected}")
    for part, spec in zip(enc.parts, specs, strict=True):
        data = part.data
        if data.dtype != spec.dtype or tuple(data.shape) != spec.shape:
            raise ValueError(
                f"{enc.codec} decode: part {spec.name!r} is {data.dtype} {tuple(data.shape)}, "
                f"header expects {spec.dtype} {spec.shape}"
            )
        if not data.is_contiguous():
            raise ValueError(f"{enc.codec} decode: part {spec.name!r} is not contiguous")
