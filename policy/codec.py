"""Adaptive codec choice per link (pure): from the link's measured bandwidth and each codec's measured
ratio and encode/decode throughput, pick the codec with the smallest predicted delivery time among those the
quality floor allows, and say why. Compression is chosen only when it makes delivery faster.

Delivery of ``raw`` bytes in ``chunks`` equal pieces (layers, when the transfer is pipelined) through three
stages, encode → wire → decode, each chunk entering a stage when the previous chunk has left it, takes
``sum(stage) / chunks + (chunks - 1) / chunks * max(stage)``; one chunk is the unpipelined sum.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from protocol.kv_config import KVCodecKind, KVQualityFloor

# Codec -> quality rank (lower is more exact); a floor admits every codec ranked at or below its own.
QUALITY_RANK = {
    KVCodecKind.NONE: 0,
    KVCodecKind.LOSSLESS: 0,
    KVCodecKind.INT8: 1,
    KVCodecKind.FP8: 2,
    KVCodecKind.INT4: 3,
}
_FLOOR_RANK = {
    KVQualityFloor.LOSSLESS: 0,
    KVQualityFloor.INT8: 1,
    KVQualityFloor.FP8: 2,
    KVQualityFloor.INT4: 3,
}


@dataclass(frozen=True, slots=True)
class CodecProfile:
    """Measured figures of one codec on this machine: wire bytes per raw byte, and bytes/s through encode and
    decode (raw bytes per second). ``none`` costs nothing: give it infinite throughput."""

    name: KVCodecKind
    ratio: float
    encode_bps: float
    decode_bps: float

    def __post_init__(self) -> None:
        if self.name not in QUALITY_RANK:
            raise ValueError(f"unknown codec {self.name!r}; known: {', '.join(QUALITY_RANK)}")
        object.__setattr__(self, "name", KVCodecKind(self.name))
        if not 0 < self.ratio <= 2 or self.encode_bps <= 0 or self.decode_bps <= 0:
            raise ValueError(f"{self.name}: ratio must be in (0, 2] and throughputs > 0")

    def observe_encode(self, raw_bytes: int, seconds: float, alpha: float = 0.5) -> CodecProfile:
        """The profile after a real transfer encoded ``raw_bytes`` in ``seconds``: its encode throughput
        moves towards the measured one. The start-up figure comes from an idle worker; under load the same
        codec ran about half as fast, and a policy that never learns that keeps picking a codec slower than
        raw. A codec that costs nothing (``none``) stays free."""
        if raw_bytes <= 0 or seconds <= 0 or self.encode_bps == float("inf"):
            return self
        measured = raw_bytes / seconds
        return replace(self, encode_bps=(1 - alpha) * self.encode_bps + alpha * measured)


@dataclass(frozen=True, slots=True)
class LinkEstimate:
    """Wire bandwidth of one (source, destination) link in bytes/s: a probe at first contact, then an
    exponential average over real transfers."""

    bandwidth_bps: float
    samples: int = 0

    def observe(self, wire_bytes: int, seconds: float, alpha: float = 0.2) -> LinkEstimate:
        """The estimate after a transfer of ``wire_bytes`` that took ``seconds`` on the wire."""
        if wire_bytes <= 0 or seconds <= 0:
            return self
        measured = wire_bytes / seconds
        if self.samples == 0:
            return LinkEstimate(measured, 1)
        return LinkEstimate((1 - alpha) * self.bandwidth_bps + alpha * measured, self.samples + 1)


@dataclass(frozen=True, slots=True)
class CodecChoice:
    codec: KVCodecKind
    predicted_s: float
    reason: str
    predictions: tuple[tuple[KVCodecKind, float], ...]  # every admitted codec, fastest first


def predict_delivery_s(raw_bytes: int, link: LinkEstimate, profile: CodecProfile, chunks: int = 1) -> float:
    if raw_bytes < 0 or chunks < 1:
        raise ValueError("raw_bytes must be >= 0 and chunks >= 1")
    stages = (
        raw_bytes / profile.encode_bps,
        raw_bytes * profile.ratio / link.bandwidth_bps,
        raw_bytes / profile.decode_bps,
    )
    return sum(stages) / chunks + (chunks - 1) / chunks * max(stages)


TIE_MARGIN = 0.10
"""Predictions within this fraction of the fastest count as a tie, which the more exact codec wins: the
model's throughputs are measured on an idle worker, and a codec predicted 3% faster than raw was measured
1.4-4x slower on a busy 2-core machine (10 Gbit/s link, ``benchmarks/kv_transfer.py``)."""


def choose_codec(
    raw_bytes: int,
    link: LinkEstimate | None,
    profiles: Iterable[CodecProfile],
    floor: KVQualityFloor,
    chunks: int = 1,
    margin: float = TIE_MARGIN,
) -> CodecChoice:
    """The admitted codec with the smallest predicted delivery time; within ``margin`` of it, the most
    exact one. A link not measured yet (``None``) gets the most exact admitted codec."""
    admitted = [p for p in profiles if QUALITY_RANK[p.name] <= _FLOOR_RANK[floor]]
    if not admitted:
        raise ValueError(f"no measured codec is admitted by quality floor {floor.value!r}")
    if link is None:
        exact = min(admitted, key=lambda p: (QUALITY_RANK[p.name], p.ratio != 1.0)).name
        return CodecChoice(exact, 0.0, f"{exact}: the link is not measured yet (its probe runs)", ())
    timed = sorted(
        (predict_delivery_s(raw_bytes, link, p, chunks), QUALITY_RANK[p.name], p.name) for p in admitted
    )
    fastest = timed[0][0]
    best_s, _, best = min((t for t in timed if t[0] <= fastest * (1 + margin)), key=lambda t: t[1])
    baseline = next((t for t, _, name in timed if name is KVCodecKind.NONE), None)
    gbit = link.bandwidth_bps * 8 / 1e9
    if baseline is None or best is KVCodecKind.NONE:
        reason = f"{best}: fastest predicted delivery ({best_s * 1e3:.2f} ms) on a {gbit:.2f} Gbit/s link"
    else:
        reason = (
            f"{best}: predicted {best_s * 1e3:.2f} ms against {baseline * 1e3:.2f} ms raw on a "
            f"{gbit:.2f} Gbit/s link"
        )
    return CodecChoice(best, best_s, reason, tuple((name, t) for t, _, name in timed))


def profiles_from_benchmark(rows: Sequence[dict[str, float | str]]) -> tuple[CodecProfile, ...]:
    """Profiles from ``benchmarks/kv_codecs.py`` result rows (codec, ratio, encode_gbps, decode_gbps)."""
    return tuple(
        CodecProfile(
            KVCodecKind(str(r["codec"])),
            float(r["ratio"]),
            float(r["encode_gbps"]) * 1e9,
            float(r["decode_gbps"]) * 1e9,
        )
        for r in rows
    )
