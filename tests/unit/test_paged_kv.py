from __future__ import annotations

import pytest
import torch

from kv_transfer.vllm.paged import (
    PagedLayout,
    block_halves,
    block_images,
    block_spans,
    gather,
    put_block_images,
    scatter,
)


@pytest.mark.parametrize("fused", [True, False])
def test_scatter_then_gather_returns_the_tokens_and_touches_only_their_blocks(fused: bool) -> None:
    heads, dim, block, blocks = 3, 8, 4, 10
    shape = (blocks, heads, block, 2 * dim) if fused else (2, blocks, block, heads, dim)
    # (CPU: allocated [blocks, heads, block, 2*dim], used as [blocks, heads, 2*block, dim].)
    layer = torch.randn(shape).to(torch.bfloat16)
    before = layer.clone()
    layout = PagedLayout.infer(layer, heads)
    assert (layout.cpu_fused, layout.block_size, layout.head_dim) == (fused, block, dim)
    key = torch.randn(12, heads, dim).to(torch.bfloat16)
    value = torch.randn(12, heads, dim).to(torch.bfloat16)
    ids = [7, 2, 5]
    scatter(layer, layout, ids, key, value)
    k, v = gather(layer, layout, ids)
    assert torch.equal(k, key) and torch.equal(v, value)
    untouched = [b for b in range(blocks) if b not in ids]
    if fused:
        assert torch.equal(layer[untouched], before[untouched])
        # token 1 of block 2 (the request's first block), head 0: keys then values, block_size rows each
        rows = layer.view(blocks, heads, 2 * block, dim)
        assert torch.equal(rows[7, 0, 1], key[1, 0]) and torch.equal(rows[7, 0, block + 1], value[1, 0])
    else:
        assert torch.equal(layer[:, untouched], before[:, untouched])


@pytest.mark.parametrize("fused", [True, False])
def test_block_spans_point_at_exactly_the_bytes_of_the_block_images(fused: bool) -> None:
    """A transport sends a migration's blocks straight from these spans: they must hold the block images'
    bytes, in their order (adjacent blocks in one span where they touch)."""
    heads, dim, block, blocks = 3, 8, 4, 10
    shape = (blocks, heads, block, 2 * dim) if fused else (2, blocks, block, heads, dim)
    layer = torch.randn(shape).to(torch.bfloat16)
    layout = PagedLayout.infer(layer, heads)
    memory = layer.view(-1).view(torch.uint8)
    for ids in ([7, 2, 3, 5], [7, 2, 3, 4, 5]):
        for image, spans in zip(
            block_images(layer, layout, ids), block_spans(layer, layout, ids), strict=True
        ):
            got = torch.cat([memory[a - layer.data_ptr() : a - layer.data_ptr() + n] for a, n in spans])
            assert torch.equal(got, image.contiguous().view(-1).view(torch.uint8))
    with pytest.raises(ValueError, match="contiguous"):
        block_spans(layer.transpose(0, 1), layout, ids)


@pytest.mark.parametrize("fused", [True, False])
def test_a_run_of_adjacent_blocks_goes_out_as_one_span_a_part(fused: bool) -> None:
    """Every span is a write of its own on the wire (15,000 of them for a 4096-token push when each block
    half was one): blocks next to each other in the cache go as one."""
    heads, dim, block = 3, 8, 4
    layer = torch.zeros((64, heads, block, 2 * dim) if fused else (2, 64, block, heads, dim))
    layout = PagedLayout.infer(layer, heads)
    first, second = block_spans(layer, layout, list(range(10, 42)))
    assert len(first) == len(second) == 1
    first, second = block_spans(layer, layout, [*range(10, 20), *range(30, 36)])
    assert len(first) + len(second) == (3 if fused else 4)  # fused: the cut falls in the first run


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("n", [5, 6])
def test_block_images_land_in_other_blocks_whole_from_any_block_on(fused: bool, n: int) -> None:
    """The receiver loads block images per block (``block_halves``), some now and some later, skipping
    the ones a prefix-cache hit holds: each block must land whole in its place, and nothing else change."""
    heads, dim, block, blocks = 3, 8, 4, 16
    shape = (blocks, heads, block, 2 * dim) if fused else (2, blocks, block, heads, dim)
    source = torch.randn(shape).to(torch.bfloat16)
    layout = PagedLayout.infer(source, heads)
    ids = [9, 3, 4, 12, 0, 7][:n]
    first, second = block_images(source, layout, ids)
    landed = torch.cat([first.reshape(-1), second.reshape(-1)])  # end to end, as in a transfer's slot
    parts = landed[: first.numel()].view(first.shape), landed[first.numel() :].view(second.shape)
    for where in (parts, (first.clone(), second.clone())):  # views of the slot, or copies apart
        key, value = block_halves(layout, *where)
        assert key.shape == (n, block, heads, dim)
        target = torch.zeros_like(source)
        mine = [1, 2, 5, 6, 8, 10][:n]
        put_block_images(target, layout, mine[2:4], key[2:4], value[2:4])  # from block 2 on, in two goes
        put_block_images(target, layout, mine[4:], key[4:], value[4:])
        bs = source.view(blocks, -1) if fused else source.transpose(0, 1).reshape(blocks, -1)
        got = target.view(blocks, -1) if fused else target.transpose(0, 1).reshape(blocks, -1)
        for i in range(n):
            assert torch.equal(got[mine[i]], bs[ids[i]] if i >= 2 else torch.zeros_like(bs[0]))
        assert not got[[b for b in range(blocks) if b not in mine]].any()


def test_too_few_blocks_is_an_error() -> None:
    layer = torch.zeros(4, 2, 4, 16)
    layout = PagedLayout.infer(layer, 2)
    with pytest.raises(ValueError, match="need 3 blocks"):
        scatter(layer, layout, [0, 1], torch.zeros(12, 2, 8), torch.zeros(12, 2, 8))
    with pytest.raises(ValueError, match="whole number"):
        scatter(layer, layout, [0, 1], torch.zeros(9, 2, 8), torch.zeros(9, 2, 8))
    with pytest.raises(ValueError, match="unsupported paged KV layout"):
        PagedLayout.infer(torch.zeros(4, 5, 4, 16), 2)


def test_channel_major_keys_come_out_token_major() -> None:
    """vLLM CPU's ``vec`` kernels store a block's keys as ``[head_dim, block_size]`` per head and the values
    token-major; with that order gather returns token-major K, and scatter writes the stored order back."""
    heads, dim, block, blocks = 2, 8, 4, 3
    layer = torch.zeros(blocks, heads, block, 2 * dim)
    t, d = torch.meshgrid(torch.arange(block), torch.arange(dim), indexing="ij")
    layout = PagedLayout.infer(layer, heads).with_block_order((d * block + t).reshape(-1), None)
    assert layout.key_slots is not None and layout.value_slots is None
    key = torch.randn(2 * block, heads, dim)
    value = torch.randn(2 * block, heads, dim)
    rows = layer.view(blocks, heads, 2 * block, dim)
    # write block 2 then block 0 as the kernel would: keys channel-major, values token-major
    for slot, b in enumerate((2, 0)):
        tokens = slice(slot * block, (slot + 1) * block)
        rows[b, :, :block] = key[tokens].permute(1, 2, 0).reshape(heads, block, dim)
        rows[b, :, block:] = value[tokens].permute(1, 0, 2)
    k, v = gather(layer, layout, [2, 0])
    assert torch.equal(k, key) and torch.equal(v, value)
    stored = layer.clone()
    layer.zero_()
    scatter(layer, layout, [2, 0], key, value)
    assert torch.equal(layer, stored)


def test_block_order_must_be_a_permutation() -> None:
    layout = PagedLayout.infer(torch.zeros(4, 2, 4, 16), 2)
    assert layout.with_block_order(torch.arange(32), torch.arange(32)).key_slots is None
    with pytest.raises(ValueError, match="not a permutation"):
        layout.with_block_order(torch.zeros(32, dtype=torch.long), None)
    with pytest.raises(ValueError, match="not a permutation"):
        layout.with_block_order(None, torch.arange(31))
