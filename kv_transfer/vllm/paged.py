"""Reading one request's K and V out of a vLLM paged KV layer and writing them back, token-major.

vLLM CPU allocates each attention layer as ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]`` but
uses it as ``[num_blocks, num_kv_heads, 2 * block_size, head_dim]``: per block and head, ``block_size`` rows
of keys then ``block_size`` rows of values (``CPUAttentionBackendImpl``). The CUDA backends keep
``[2, num_blocks, block_size, num_kv_heads, head_dim]``. Codecs take ``[tokens, num_kv_heads, head_dim]``.

Inside a block the CPU kernels order the elements for their ISA: with ``vec`` (AVX-512 without AMX) the keys
of a block and head are stored channel-major, ``[head_dim, block_size]``, while the values stay token-major.
A layout therefore carries, per block and head, the position of every (token, channel) element of K and of V
(``key_slots``, ``value_slots``; ``None`` for token-major). The connector learns them by running vLLM's own
cache-write kernel on a probe (``probe_block_order``), so gather returns true token-major
K and V: the lossy codecs group keys per channel along tokens and values per token, as KIVI prescribes, and
that only means something in token-major order.

Whole blocks move, never part of one; a transfer carries the prompt rounded up to full blocks, and the
decode side computes its own tokens over the padding.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PagedLayout:
    """How one layer's cache tensor is laid out; inferred from the tensor and the model's KV head count."""

    cpu_fused: bool  # True: [blocks, heads, 2*block, dim] in use; False: [2, blocks, block, heads, dim]
    block_size: int
    num_kv_heads: int
    head_dim: int
    # CPU only: key_slots[t * head_dim + d] is where key (token t, channel d) of a block and head sits among
    # that block and head's block_size * head_dim key elements; the same for values. None: token-major.
    key_slots: torch.Tensor | None = None
    value_slots: torch.Tensor | None = None

    @classmethod
    def infer(cls, layer: torch.Tensor, num_kv_heads: int) -> PagedLayout:
        if layer.dim() == 4 and layer.shape[1] == num_kv_heads:
            return cls(True, int(layer.shape[2]), num_kv_heads, int(layer.shape[3]) // 2)
        if layer.dim() == 5 and layer.shape[0] == 2 and layer.shape[3] == num_kv_heads:
            return cls(False, int(layer.shape[2]), num_kv_heads, int(layer.shape[4]))
        raise ValueError(f"unsupported paged KV layout {tuple(layer.shape)} for {num_kv_heads} KV heads")

    def with_block_order(
        self, key_slots: torch.Tensor | None, value_slots: torch.Tensor | None
    ) -> PagedLayout:
        """This layout with the in-block element order found by a probe; identity orders become None."""
        n = self.block_size * self.head_dim
        identity = torch.arange(n)
        orders = []
        for name, slots in (("key", key_slots), ("value", value_slots)):
            if slots is not None:
                slots = slots.to(torch.long).cpu()
                if slots.shape != (n,) or not torch.equal(slots.sort().values, identity):
                    raise ValueError(f"{name} block order is not a permutation of {n} elements")
                if torch.equal(slots, identity):
                    slots = None
            orders.append(slots)
        return dataclasses.replace(self, key_slots=orders[0], value_slots=orders[1])

    def padded(self, tokens: int) -> int:
        """``tokens`` rounded up to whole blocks: what a transfer of ``tokens`` carries."""
        return -(-tokens // self.block_size) * self.block_size

    def token_bytes(self, dtype: torch.dtype) -> int:
        """Raw bytes of K plus V for one token of one layer."""
        return 2 * self.num_kv_heads * self.head_dim * dtype.itemsize


def block_format(layout: PagedLayout, dtype: torch.dtype) -> str:
    """A signature of how a block is stored, and of how ``block_images`` lays the images out (``cpu-whole``:
    whole images end to end): two engines with the same one can exchange raw block images."""
    order = "".join(
        "t" if slots is None else f"p{zlib.crc32(slots.to(torch.int64).numpy().tobytes()):08x}"
        for slots in (layout.key_slots, layout.value_slots)
    )
    fused = "cpu-whole" if layout.cpu_fused else "split"
    return f"{fused}/{layout.block_size}x{layout.num_kv_heads}x{layout.head_dim}/{dtype}/{order}"


def block_images(
    layer: torch.Tensor, layout: PagedLayout, block_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the blocks exactly as stored, as the two parts a transfer carries, each shaped
    ``[n * block_size, heads, dim]``: on the split layout the keys and the values; on the fused CPU layout
    the block images laid end to end and cut in the middle, so that a run of adjacent blocks goes out as
    one span (``block_spans``). Each span is a UCX write of its own: as two spans a block, a 4096-token
    push's 94 MB cost the sender 26-33 ms of CPU on loopback with 128-token blocks and 123-133 ms with
    16-token blocks, as runs of whole blocks 18-20 and 26-38 ms. Only ``block_halves`` and
    ``put_block_images`` on a layout with the same ``block_format`` read them back."""
    index = torch.tensor(block_ids, dtype=torch.long, device=layer.device)
    heads, dim = layout.num_kv_heads, layout.head_dim
    if layout.cpu_fused:
        images = layer.view(layer.shape[0], -1).index_select(0, index).view(-1)
        middle = images.numel() // 2
        return images[:middle].view(-1, heads, dim), images[middle:].view(-1, heads, dim)
    return (
        layer[0].index_select(0, index).reshape(-1, heads, dim),
        layer[1].index_select(0, index).reshape(-1, heads, dim),
    )


def block_spans(
    layer: torch.Tensor, layout: PagedLayout, block_ids: list[int]
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Where the two parts of ``block_images`` sit in memory, as ``(address, nbytes)`` spans in order
    (adjacent spans merged), so that a transport can send them without copying. ``layer`` must be
    contiguous."""
    if not layer.is_contiguous():
        raise ValueError("block spans need a contiguous layer")
    base, blocks = layer.data_ptr(), int(layer.shape[1] if not layout.cpu_fused else layer.shape[0])
    half = layout.block_size * layout.num_kv_heads * layout.head_dim * layer.element_size()
    if layout.cpu_fused:  # block b: 2 * half bytes, whole; the parts cut the run of them in the middle
        return _cut(_merged([(base + b * 2 * half, 2 * half) for b in block_ids]), len(block_ids) * half)
    # [2, blocks, ...]: all key blocks, then all value blocks
    first = [(base + b * half, half) for b in block_ids]
    second = [(base + (blocks + b) * half, half) for b in block_ids]
    return _merged(first), _merged(second)


def _cut(spans: list[tuple[int, int]], at: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``spans`` split into the ones holding their first ``at`` bytes and the ones holding the rest."""
    first: list[tuple[int, int]] = []
    second: list[tuple[int, int]] = []
    for address, nbytes in spans:
        take = min(nbytes, max(0, at))
        if take:
            first.append((address, take))
        if nbytes > take:
            second.append((address + take, nbytes - take))
        at -= nbytes
    return first, second


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for address, nbytes in spans:
        if out and out[-1][0] + out[-1][1] == address:
            out[-1] = (out[-1][0], out[-1][1] + nbytes)
        else:
            out.append((address, nbytes))
    return out


def block_halves(
    layout: PagedLayout, first: torch.Tensor, second: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two parts of ``block_images`` (as landed) per block: the first and the second half of each block's
    image, shaped ``[n, block_size, heads, dim]``, so that ``[i:j]`` are blocks i to j-1. Views where the two
    parts lie end to end in memory (as in a transfer's slot), a copy otherwise."""
    bs, heads, dim = layout.block_size, layout.num_kv_heads, layout.head_dim
    n = int(first.shape[0]) // bs
    if n * bs != first.shape[0] or first.shape != second.shape or tuple(first.shape[1:]) != (heads, dim):
        raise ValueError(
            f"block images of {tuple(first.shape)} and {tuple(second.shape)} are not whole blocks"
        )
    shape = (n, bs, heads, dim)
    if not layout.cpu_fused:
        return first.reshape(shape), second.reshape(shape)
    size = bs * heads * dim  # elements in half a block
    adjacent = (
        first.is_contiguous()
        and second.is_contiguous()
        and first.dtype == second.dtype
        and first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
        and second.data_ptr() == first.data_ptr() + first.nbytes
    )
    images = (
        torch.as_strided(first, (n, 2, size), (2 * size, size, 1), first.storage_offset())
        if adjacent
        else torch.cat([first.reshape(-1), second.reshape(-1)]).view(n, 2, size)
    )
    return images[:, 0].view(shape), images[:, 1].view(shape)


def put_block_images(
    layer: torch.Tensor, layout: PagedLayout, block_ids: list[int], first: torch.Tensor, second: torch.Tensor
) -> None:
    """Write the block halves of ``block_halves`` (``[n, block_size, heads, dim]`` each) into the first ``n``
    of ``block_ids``."""
    needed = int(first.shape[0])
    if first.dim() != 4 or first.shape != second.shape:
        raise ValueError(f"block halves of {tuple(first.shape)} and {tuple(second.shape)}")
    if needed > len(block_ids):
        raise ValueError(f"{needed} block images, the request holds {len(block_ids)} blocks")
    index = torch.tensor(block_ids[:needed], dtype=torch.long, device=layer.device)
    if layout.cpu_fused:  # each half straight into its place: one copy (stacking them first took two)
        halves = layer.view(layer.shape[0], 2, -1)
        halves[:, 0].index_copy_(0, index, first.to(layer.dtype).reshape(needed, -1))
        halves[:, 1].index_copy_(0, index, second.to(layer.dtype).reshape(needed, -1))
    else:
        layer[0].index_copy_(0, index, first.to(layer.dtype))
        layer[1].index_copy_(0, index, second.to(layer.dtype))


def _blocks_view(layer: torch.Tensor, layout: PagedLayout) -> torch.Tensor:
    """The CPU layer as ``[blocks, heads, 2, block, dim]`` (index 0: keys, 1: values)."""
    return layer.view(layer.shape[0], layout.num_kv_heads, 2, layout.block_size, layout.head_dim)


def gather(
    layer: torch.Tensor, layout: PagedLayout, block_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of K and V in ``block_ids``, each ``[len(block_ids) * block_size, heads, dim]``."""
    index = torch.tensor(block_ids, dtype=torch.long, device=layer.device)
    heads, dim = layout.num_kv_heads, layout.head_dim
    if layout.cpu_fused:
        blocks = _blocks_view(layer, layout).index_select(0, index)  # [n, heads, 2, block, dim]
        k = _token_major(blocks[:, :, 0], layout.key_slots).permute(0, 2, 1, 3).reshape(-1, heads, dim)
        v = _token_major(blocks[:, :, 1], layout.value_slots).permute(0, 2, 1, 3).reshape(-1, heads, dim)
        return k.contiguous(), v.contiguous()
    k = layer[0].index_select(0, index).reshape(-1, heads, dim)
    v = layer[1].index_select(0, index).reshape(-1, heads, dim)
    return k.contiguous(), v.contiguous()


def scatter(
    layer: torch.Tensor, layout: PagedLayout, block_ids: list[int], key: torch.Tensor, value: torch.Tensor
) -> None:
    """Write ``key`` and ``value`` (``[n * block_size, heads, dim]``, whole blocks) into the first ``n`` of
    ``block_ids``."""
    tokens = int(key.shape[0])
    if tokens % layout.block_size:
        raise ValueError(f"{tokens} tokens is not a whole number of {layout.block_size}-token blocks")
    needed = tokens // layout.block_size
    if needed > len(block_ids):
        raise ValueError(f"{tokens} tokens need {needed} blocks, the request holds {len(block_ids)}")
    index = torch.tensor(block_ids[:needed], dtype=torch.long, device=layer.device)
    heads, bs, dim = layout.num_kv_heads, layout.block_size, layout.head_dim
    if layout.cpu_fused:
        k = key.to(layer.dtype).reshape(needed, bs, heads, dim).permute(0, 2, 1, 3)
        v = value.to(layer.dtype).reshape(needed, bs, heads, dim).permute(0, 2, 1, 3)
        k, v = _block_order(k, layout.key_slots), _block_order(v, layout.value_slots)
        blocks = _blocks_view(layer, layout)
        blocks[:, :, 0].index_copy_(0, index, k)
        blocks[:, :, 1].index_copy_(0, index, v)
    else:
        layer[0][index] = key.to(layer.dtype).reshape(needed, bs, heads, dim)
        layer[1][index] = value.to(layer.dtype).reshape(needed, bs, heads, dim)


def _token_major(region: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
    """``[n, heads, block, dim]`` as stored to token-major (same shape)."""
    if slots is None:
        return region
    n, heads, block, dim = region.shape
    flat = region.reshape(n, heads, block * dim).index_select(2, slots.to(region.device))
    return flat.view(n, heads, block, dim)


def _block_order(region: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
    """Inverse of ``_token_major``: token-major ``[n, heads, block, dim]`` to the stored order."""
    if slots is None:
        return region
    n, heads, block, dim = region.shape
    stored = region.new_empty(n, heads, block * dim)
    stored[:, :, slots.to(region.device)] = region.reshape(n, heads, block * dim)
    return stored.view(n, heads, block, dim)


def probe_block_order(
    layout: PagedLayout, dtype: torch.dtype, kv_cache_dtype: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where vLLM CPU's cache-write kernel puts each (token, channel) of a block's K and V: run the kernel
    the attention backend uses (same ISA choice) on one block of one head, twice, writing the low and the
    high byte of every element's token-major index (integers up to 255 are exact in bf16 and fp16)."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    bs, dim = layout.block_size, layout.head_dim
    if bs * dim > 1 << 16:
        raise ValueError(f"block of {bs} x {dim} is too large to probe")
    isa = _get_attn_isa(dtype, bs, dim, kv_cache_dtype)
    index = torch.arange(bs * dim).view(bs, 1, dim)
    found = []
    for digit in (index % 256, index // 256):
        cache = torch.full((1, 1, 2 * bs, dim), -1.0, dtype=dtype)
        key_cache, value_cache = cache.chunk(2, dim=2)
        probe = digit.to(dtype)
        ops.cpu_attn_reshape_and_cache(probe, probe, key_cache, value_cache, torch.arange(bs), isa)
        found.append((key_cache.reshape(-1).long(), value_cache.reshape(-1).long()))
    orders = []
    for kind in (0, 1):
        held = found[0][kind] + 256 * found[1][kind]  # token-major index held at each stored position
        if (held < 0).any():
            raise RuntimeError(f"vLLM's {isa} cache kernel left part of a probe block unwritten")
        slots = torch.empty_like(held)
        slots[held] = torch.arange(held.numel())
        orders.append(slots)
    log.info("pdflow connector: vLLM CPU attention ISA %s, block order probed", isa)
    return orders[0], orders[1]
