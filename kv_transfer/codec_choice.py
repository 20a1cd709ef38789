"""The codec policy applied: measures each codec on this worker's own KV shape at start, keeps a bandwidth
estimate per destination (a probe at first contact, then an exponential average over real transfers) and asks
``codec_policy.choose_codec`` for each transfer. State lives here; the decision stays pure."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from kv_transfer.codec import CODEC_NAMES, KVKind, get_codec
from kv_transfer.codec_policy import CodecChoice, CodecProfile, LinkEstimate, QualityFloor, choose_codec
from kv_transfer.paged import PagedLayout

log = logging.getLogger(__name__)

_LOSSY = ("fp8", "int8", "int4")
_PROFILE_TOKENS = 2048
_PROBES = 2
"""Probe writes at first contact, the fastest kept: one 8 MB write can meet a busy moment (a 10 Gbit/s link
was read once as 1.7 Gbit/s, and int4 then looked 3x faster than raw on it)."""
_PACED_BY_ENCODER = 0.5
"""A transfer whose encoding took more than this share of its time on the wire was paced by its encoder:
its bytes over that time measure the encoder, not the link, and are not learnt as the link's bandwidth.
(Learnt, one int4 transfer made a 10 Gbit/s link read 1.6 Gbit/s, and int4 was picked from then on.)"""


def measure_profiles(
    shape: tuple[int, int, int], dtype: torch.dtype, group_size: int, repeats: int = 3
) -> tuple[CodecProfile, ...]:
    """Ratio and encode/decode throughput of every codec on random data of ``shape`` (best of ``repeats``).
    ``none`` is free: it leaves straight from the KV cache (or is copied into staging, as every codec's
    output is)."""
    kv = torch.randn(shape).to(dtype)
    profiles = [CodecProfile("none", 1.0, float("inf"), float("inf"))]
    for name in CODEC_NAMES[1:]:
        codec = get_codec(name, **({"group_size": group_size} if name in _LOSSY else {}))
        enc_s = dec_s = float("inf")
        encoded = codec.encode(kv, KVKind.KEY)
        for _ in range(repeats):
            t0 = time.perf_counter()
            encoded = codec.encode(kv, KVKind.KEY)
            t1 = time.perf_counter()
            codec.decode(encoded)
            t2 = time.perf_counter()
            enc_s, dec_s = min(enc_s, t1 - t0), min(dec_s, t2 - t1)
        raw = kv.numel() * kv.element_size()
        profiles.append(CodecProfile(name, min(2.0, encoded.ratio), raw / enc_s, raw / dec_s))
    return tuple(profiles)


class CodecChooser:
    """Per-worker codec choice. ``codec`` is ``auto`` (the policy) or a codec name (always that one)."""

    def __init__(
        self,
        profiles: tuple[CodecProfile, ...],
        *,
        layers: int,
        codec: str = "auto",
        floor: str = "lossless",
        group_size: int = 64,
        probe: Callable[[str], float] | None = None,
    ) -> None:
        if codec != "auto" and codec not in CODEC_NAMES:
            raise ValueError(f"unknown KV codec {codec!r}; use auto or one of {', '.join(CODEC_NAMES)}")
        self.profiles = profiles
        self._layers = layers
        self._codec = codec
        self._floor = QualityFloor(floor)
        self._group_size = group_size
        self._links: dict[str, LinkEstimate] = {}
        self._probe = probe

    @classmethod
    def for_layout(
        cls, layout: PagedLayout, dtype: torch.dtype, *, layers: int, codec: str, floor: str, group_size: int
    ) -> CodecChooser:
        profiles = measure_profiles(
            (_PROFILE_TOKENS, layout.num_kv_heads, layout.head_dim), dtype, group_size
        )
        log.info("codec profiles: %s", ", ".join(f"{p.name} {p.ratio:.3f}" for p in profiles))
        return cls(profiles, layers=layers, codec=codec, floor=floor, group_size=group_size)

    def bind_probe(self, probe: Callable[[str], float]) -> None:
        self._probe = probe

    def options(self, codec: str) -> dict[str, int]:
        return {"group_size": self._group_size} if codec in _LOSSY else {}

    def choose(self, destination: str, raw_bytes: int, *, override: str | None = None) -> CodecChoice:
        fixed = override or (self._codec if self._codec != "auto" else None)
        if fixed is not None:
            if fixed not in CODEC_NAMES:
                raise ValueError(f"unknown KV codec {fixed!r}; valid codecs: {', '.join(CODEC_NAMES)}")
            why = "requested for this transfer" if override else "set in the config (engine.kv_codec)"
            return CodecChoice(fixed, 0.0, f"{fixed}: {why}", ())
        link = self._links.get(destination)
        if link is None:
            bandwidth = max(self._probe(destination) for _ in range(_PROBES)) if self._probe else 1e9
            link = LinkEstimate(bandwidth, 0)
            self._links[destination] = link
        return choose_codec(raw_bytes, link, self.profiles, self._floor, chunks=self._layers)

    def observe(
        self,
        destination: str,
        wire_bytes: int,
        wire_s: float,
        *,
        codec: str = "",
        raw_bytes: int = 0,
        encode_s: float = 0.0,
    ) -> None:
        """Learn from a transfer sent to ``destination``: the link's bandwidth (unless the encoder paced
        the transfer, ``_PACED_BY_ENCODER``), and how fast ``codec`` really encoded its ``raw_bytes``."""
        link = self._links.get(destination)
        if link is not None and encode_s <= _PACED_BY_ENCODER * wire_s:
            self._links[destination] = link.observe(wire_bytes, wire_s)
        self.profiles = tuple(
            p.observe_encode(raw_bytes, encode_s) if p.name == codec else p for p in self.profiles
        )
