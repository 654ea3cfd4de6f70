"""Keep the accepted path of a verified token tree in the KV cache, in consecutive positions.

A tree step writes node i's keys and values at position starts[b] + i of the row's slot. Once the
path is known (tree_accept.py: path[b, 0] = 0, then count[b] accepted nodes), node path[b, i] moves
to position starts[b] + i, for every layer, K and V, and every KV head; what lies beyond
starts[b] + count[b] is left as it is (the row's length will not cover it). The linear cache layout
never changes. For a chain, path[b, i] = i and nothing moves.

Kernel: one program per (row, layer x K/V x KV head), walking the path in order. Moving in order is
safe in place: path[b, j] >= j, so position starts + i (written at step i) is never a source of a
later step j > i, whose source is starts + path[b, j] >= starts + j > starts + i.
"""

import torch

from ._triton import pow2, tl, triton


@triton.jit
def _compact_kernel(cache_ptr, slots_ptr, starts_ptr, path_ptr, count_ptr, T, n_heads, slot_stride,
                    head_stride, pos_stride, plane_stride, head_dim, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    plane = tl.program_id(1)  # layer, K or V: [layers * 2] planes of [slots, heads, capacity, head_dim]
    base = (plane // n_heads).to(tl.int64) * plane_stride + (plane % n_heads).to(tl.int64) * head_stride \
        + tl.load(slots_ptr + b).to(tl.int64) * slot_stride
    start = tl.load(starts_ptr + b).to(tl.int64)
    count = tl.load(count_ptr + b)
    d = tl.arange(0, BLOCK_D)
    for i in range(1, T):
        src = tl.load(path_ptr + b * T + i).to(tl.int64)
        # The whole head_dim moves, or nothing (a scalar bound keeps the mask one comparison).
        ok = d < tl.where((count >= i) & (src != i), head_dim, 0)
        row = tl.load(cache_ptr + base + (start + src) * pos_stride + d, mask=ok)
        tl.store(cache_ptr + base + (start + i) * pos_stride + d, row, mask=ok)


def kv_compact(cache: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor, path: torch.Tensor,
               count: torch.Tensor) -> None:
    """cache: the whole LinearKVCache.data [layers, 2, slots, kv_heads, capacity, head_dim]."""
    layers, two, _, heads, _, head_dim = cache.shape
    if cache.stride(-1) != 1 or cache.stride(1) * 2 != cache.stride(0):
        raise ValueError("kv_compact: the cache must be LinearKVCache.data (contiguous planes)")
    batch, t = path.shape
    path, count = path.contiguous(), count.contiguous()
    _compact_kernel[(batch, layers * two * heads)](
        cache, slots, starts, path, count, t, heads, cache.stride(2), cache.stride(3), cache.stride(4),
        cache.stride(1), head_dim, BLOCK_D=pow2(head_dim), num_warps=1)


def kv_compact_ref(cache: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor, path: torch.Tensor,
                   count: torch.Tensor) -> None:
    for b in range(path.shape[0]):
        n = int(count[b]) + 1
        slot, start = int(slots[b]), int(starts[b])
        src = start + path[b, :n].long()
        cache[:, :, slot, :, start:start + n] = cache[:, :, slot, :, src].clone()
