"""Directed rounding of fp32 scales and zero points to the forms they are stored in: fp16, or a one-byte
logarithmic scale code.

Rounding the stored values in the safe direction (a zero point down, a scale up) keeps every input inside the
range the stored grid covers, so the error bounds hold for the values actually on the wire, not just for the
fp32 values they were computed from.

The log scale code ``c`` (uint8) stands for ``2 ** (c / 8 - 18)``: eight steps an octave (a scale rounds up by
at most 9%, 0.12 bits of an integer code) from ``2**-18`` to ``2**13.875``, which covers any fp16 range over
15 levels. It puts 1 byte on the wire per group instead of 2, which is what brings int8 and int4 with groups
of 64 under 0.53 and 0.28 of bf16. Decoding is a table lookup, so every device reads the same fp32 scale.
"""

from __future__ import annotations

import torch

LOG_SCALE_PER_OCTAVE = 8
LOG_SCALE_MIN_EXP = -18
LOG_SCALE_TABLE = torch.exp2(
    torch.arange(256, dtype=torch.float64) / LOG_SCALE_PER_OCTAVE + LOG_SCALE_MIN_EXP
).float()
"""fp32 value of each log scale code, ascending."""

FP16_TINY = 2.0**-24
"""Smallest positive fp16 (subnormal): the floor for a scale, so that a constant group never divides by 0."""


_FP16_INF = torch.tensor(torch.inf, dtype=torch.float16)


def fp16_round_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 >= each fp32 element (finite inputs within fp16's range)."""
    nearest = x.to(torch.float16)
    return torch.where(nearest.float() < x, torch.nextafter(nearest, _FP16_INF.to(x.device)), nearest)


def fp16_round_down(x: torch.Tensor) -> torch.Tensor:
    """The largest fp16 <= each fp32 element (finite inputs within fp16's range)."""
    nearest = x.to(torch.float16)
    return torch.where(nearest.float() > x, torch.nextafter(nearest, -_FP16_INF.to(x.device)), nearest)


def log_scale_up(x: torch.Tensor) -> torch.Tensor:
    """uint8 code of the smallest log scale >= each fp32 element (non-negative, at most
    ``LOG_SCALE_TABLE[-1]``; zero and anything below the table get its smallest entry)."""
    table = LOG_SCALE_TABLE.to(x.device)
    return torch.searchsorted(table, x.contiguous()).clamp_(max=len(table) - 1).to(torch.uint8)


def log_scale_value(codes: torch.Tensor) -> torch.Tensor:
    """fp32 scales of uint8 log scale codes."""
    return LOG_SCALE_TABLE.to(codes.device)[codes.long()]
