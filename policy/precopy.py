"""The stages of a live migration's pre-copy (Llumnix): while the request keeps decoding on the source, each
stage copies the whole KV blocks that filled since the last one (a running request never rewrites a full
block); once few blocks are left, or after ``max_stages``, the stream freezes and one last push copies the
rest, the partial block included. Pure: the source's migration loop asks, then pushes."""

from __future__ import annotations

from dataclasses import dataclass

from protocol.config import MigrationConfig


@dataclass(frozen=True, slots=True)
class Stage:
    """Push blocks ``[first_block, end_block)``."""

    first_block: int
    end_block: int


def next_precopy(
    kv_tokens: int, pushed_blocks: int, stages: int, block_size: int, config: MigrationConfig
) -> Stage | None:
    """The next pre-copy stage for a request whose engine holds the KV of ``kv_tokens`` tokens,
    ``pushed_blocks`` of them pushed in ``stages`` stages so far; None when the pre-copy is over: the stage
    limit is reached, at most ``config.final_blocks`` blocks are left, or no full block is new."""
    if stages >= config.max_stages:
        return None
    full = kv_tokens // block_size
    left = -(-kv_tokens // block_size) - pushed_blocks
    if left <= config.final_blocks or full <= pushed_blocks:
        return None
    return Stage(pushed_blocks, full)


def last_push(kv_tokens: int, pushed_blocks: int, block_size: int) -> Stage | None:
    """What the paused request's last push copies (every block not pushed yet, the partial one included), or
    None when the pre-copy already holds it all."""
    end = -(-kv_tokens // block_size)
    return Stage(pushed_blocks, end) if end > pushed_blocks else None
