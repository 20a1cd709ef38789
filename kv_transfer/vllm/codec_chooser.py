"""The codec policy applied: measures each codec on this worker's own KV shape at start, keeps a bandwidth
estimate per destination (a probe at first contact, then an exponential average over real transfers) and asks
``policy.codec.choose_codec`` for each transfer. State lives here; the decision stays pure."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from kv_transfer.codec import CODEC_NAMES, KVKind, get_codec
from kv_transfer.vllm.paged import PagedLayout
from policy.codec import CodecChoice, CodecProfile, LinkEstimate, choose_codec
from protocol.kv_config import KVCodecKind, KVQualityFloor, KVTransferConfig

log = logging.getLogger(__name__)

_LOSSY = (KVCodecKind.FP8, KVCodecKind.INT8, KVCodecKind.INT4)
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
    profiles = [CodecProfile(KVCodecKind.NONE, 1.0, float("inf"), float("inf"))]
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
    """Per-worker codec choice. ``codec`` is ``auto`` (the policy, within ``floor``) or a codec (always that
    one). A destination's link is probed (``probe``, twice, the faster kept) on a thread of its own once the
    first transfer to it has ended, so that the probe neither runs inside the forward pass that sends that
    transfer nor shares the link with it; until the link is measured, transfers to it take the most exact
    codec the floor admits. Without ``probe`` a link reads 1 GB/s."""

    def __init__(
        self,
        profiles: tuple[CodecProfile, ...],
        *,
        layers: int,
        codec: KVCodecKind = KVCodecKind.AUTO,
        floor: KVQualityFloor = KVQualityFloor.LOSSLESS,
        group_size: int = 64,
        probe: Callable[[str], float] | None = None,
    ) -> None:
        self.profiles = profiles
        self._layers = layers
        self._codec = KVCodecKind(codec)
        self._floor = KVQualityFloor(floor)
        self._group_size = group_size
        self._probe = probe
        self._lock = threading.Lock()
        self._links: dict[str, LinkEstimate] = {}
        self._seen: set[str] = set()  # destinations chosen for, whose link is not measured yet
        self._probes: dict[str, Future[None]] = {}
        self._prober = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdflow-link-probe")

    @classmethod
    def for_layout(
        cls, layout: PagedLayout, dtype: torch.dtype, *, layers: int, settings: KVTransferConfig
    ) -> CodecChooser:
        profiles = measure_profiles(
            (_PROFILE_TOKENS, layout.num_kv_heads, layout.head_dim), dtype, settings.group_size
        )
        log.info("codec profiles: %s", ", ".join(f"{p.name} {p.ratio:.3f}" for p in profiles))
        return cls(
            profiles,
            layers=layers,
            codec=settings.codec,
            floor=settings.quality_floor,
            group_size=settings.group_size,
        )

    def bind_probe(self, probe: Callable[[str], float]) -> None:
        self._probe = probe

    def options(self, codec: KVCodecKind) -> dict[str, int]:
        return {"group_size": self._group_size} if codec in _LOSSY else {}

    def choose(self, destination: str, raw_bytes: int, *, override: KVCodecKind | None = None) -> CodecChoice:
        """The codec for a transfer of ``raw_bytes`` to ``destination``. Never blocks: a destination whose
        link is not measured yet gets the most exact admitted codec (and its probe, if a transfer to it has
        been chosen before)."""
        if override is KVCodecKind.AUTO:  # asked for the policy: as if not asked
            override = None
        fixed = override or (self._codec if self._codec is not KVCodecKind.AUTO else None)
        if fixed is not None:
            if fixed not in CODEC_NAMES:
                raise ValueError(f"unknown KV codec {fixed!r}; valid codecs: {', '.join(CODEC_NAMES)}")
            why = "requested for this transfer" if override else "set in the config (kv.codec)"
            return CodecChoice(KVCodecKind(fixed), 0.0, f"{fixed}: {why}", ())
        with self._lock:
            link = self._links.get(destination)
            if link is None and self._probe is None:
                link = self._links[destination] = LinkEstimate(1e9, 0)
            if link is None and destination in self._seen:  # its first transfer did not report back
                self._start_probe(destination)
            self._seen.add(destination)
        return choose_codec(raw_bytes, link, self.profiles, self._floor, chunks=self._layers)

    def probed(self, destination: str, timeout_s: float) -> bool:
        """Wait until the link to ``destination`` is measured, probing it now if it is not being probed (a
        benchmark's warm-up, a test); False if it was not within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if destination not in self._links and self._probe is not None:
                self._start_probe(destination)
        while True:
            with self._lock:
                if destination in self._links:
                    return True
                future = self._probes.get(destination)
            if future is None or time.monotonic() > deadline:
                return False
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:
                return destination in self._links

    def observe(
        self,
        destination: str,
        wire_bytes: int,
        wire_s: float,
        *,
        codec: KVCodecKind | str = "",
        raw_bytes: int = 0,
        encode_s: float = 0.0,
    ) -> None:
        """Learn from a transfer sent to ``destination``: the link's bandwidth (unless the encoder paced
        the transfer, ``_PACED_BY_ENCODER``), and how fast ``codec`` really encoded its ``raw_bytes``."""
        with self._lock:
            link = self._links.get(destination)
            if link is None and self._probe is not None:  # its first transfer ended: the link is free now
                self._start_probe(destination)
            if link is not None and encode_s <= _PACED_BY_ENCODER * wire_s:
                self._links[destination] = link.observe(wire_bytes, wire_s)
            self.profiles = tuple(
                p.observe_encode(raw_bytes, encode_s) if p.name == codec else p for p in self.profiles
            )

    def close(self) -> None:
        """Stop probing; a probe under way ends first (its transfer's deadline bounds it), so that the
        endpoint it writes through can close after this."""
        self._prober.shutdown(wait=True, cancel_futures=True)

    def _start_probe(self, destination: str) -> None:
        """Probe the link to ``destination`` unless a probe of it runs (the caller holds the lock)."""
        if destination not in self._probes:
            self._probes[destination] = self._prober.submit(self._measure, destination)

    def _measure(self, destination: str) -> None:
        """The probe thread: measure the link, or forget it was asked (the next transfer asks again)."""
        assert self._probe is not None
        try:
            bandwidth = max(self._probe(destination) for _ in range(_PROBES))
        except Exception as exc:
            log.info("probing the link to %s failed (%s); asked again at the next transfer", destination, exc)
            with self._lock:
                self._probes.pop(destination, None)
            return
        with self._lock:
            self._links.setdefault(destination, LinkEstimate(bandwidth, 0))
            self._probes.pop(destination, None)
