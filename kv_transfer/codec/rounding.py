"""Directed rounding of fp32 scales and zero points to the fp16 they are stored in.

Rounding the stored values in the safe direction (a zero point down, a scale up) keeps every input inside the
range the stored grid covers, so the error bounds hold for the values actually on the wire, not just for the
fp32 values they were computed from.
"""

from __future__ import annotations

import torch

FP16_TINY = 2.0**-24
"""Smallest positive fp16 (subnormal): the floor for a scale, so that a constant group never divides by 0."""


def fp16_round_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 >= each fp32 element (finite inputs within fp16's range)."""
    nearest = x.to(torch.float16)
    return torch.where(
        nearest.float() < x, torch.nextafter(nearest, torch.full_like(nearest, torch.inf)), nearest
    )


def fp16_round_down(x: torch.Tensor) -> torch.Tensor:
    """The largest fp16 <= each fp32 element (finite inputs within fp16's range)."""
    nearest = x.to(torch.float16)
    return torch.where(
        nearest.float() > x, torch.nextafter(nearest, torch.full_like(nearest, -torch.inf)), nearest
    )
