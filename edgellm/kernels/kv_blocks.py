"""Saved KV blocks in and out of a cache slot in one pass (engine/kv_store.py's device tier).

A saved block holds block_tokens positions of every layer, K and V, and KV head, contiguous:
[layers, 2, kv_heads, tokens, head_dim] (engine/kv_pool.py). In the cache slot the same positions lie
in [layers, 2, slots, kv_heads, capacity, head_dim], so each (layer, K/V, head) of a block is one
contiguous run of tokens x head_dim values on both sides. Torch needs two passes for a hit (a gather
from the pool, then a copy into the slot's permuted view, 0.12 ms for 31 blocks of the Llama-3.2-1B
shape on the H100, the copy at 1.4 TB/s); this kernel copies each run once, the block's place looked
up in the kernel.

Kernel: one program per (block, layer x K/V x head): its run of tokens x head_dim, BLOCK_T tokens at a time.
"""

import torch

from ._triton import pow2, tl, triton


@triton.jit
def _blocks_kernel(pool_ptr, cache_ptr, places_ptr, positions_ptr, slot, tokens, head_dim, n_heads,
                   s_block, s_plane_pool, s_plane_cache, s_slot, s_head, s_pos,
                   TO_SLOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    run = tl.program_id(1)  # layer x K/V x head
    plane = run // n_heads
    head = run % n_heads
    place = tl.load(places_ptr + i).to(tl.int64)
    first = tl.load(positions_ptr + i).to(tl.int64) * tokens  # the block's first position in the slot
    pool_run = pool_ptr + place * s_block + plane.to(tl.int64) * s_plane_pool + head.to(tl.int64) * tokens * head_dim
    cache_run = cache_ptr + plane.to(tl.int64) * s_plane_cache + slot * s_slot + head.to(tl.int64) * s_head
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    for t0 in range(0, tokens, BLOCK_T):
        rows = t0 + t
        ok = (rows < tokens)[:, None] & (d < head_dim)[None, :]
        at_pool = pool_run + rows[:, None] * head_dim + d[None, :]
        at_cache = cache_run + (first + rows)[:, None] * s_pos + d[None, :]
        if TO_SLOT:
            tl.store(at_cache, tl.load(at_pool, mask=ok), mask=ok)
        else:
            tl.store(at_pool, tl.load(at_cache, mask=ok), mask=ok)


def _check(pool: torch.Tensor, cache: torch.Tensor, places: torch.Tensor, positions: torch.Tensor) -> None:
    layers, two, _, heads, _, head_dim = cache.shape
    if pool.dim() != 6 or tuple(pool.shape[1:4]) != (layers, two, heads) or pool.shape[5] != head_dim \
            or not pool.is_contiguous() or pool.dtype != cache.dtype:
        raise ValueError(f"kv_blocks: pool {tuple(pool.shape)} {pool.dtype} is not contiguous blocks of cache "
                         f"{tuple(cache.shape)} {cache.dtype}")
    if cache.stride(-1) != 1 or cache.stride(0) != 2 * cache.stride(1):
        raise ValueError("kv_blocks: the cache must be LinearKVCache.data (contiguous planes)")
    if places.shape != positions.shape or places.dim() != 1:
        raise ValueError(f"kv_blocks: places {tuple(places.shape)} and positions {tuple(positions.shape)} must be "
                         "one index each per block")


def _launch(pool, cache, slot, places, positions, to_slot: bool) -> None:
    _check(pool, cache, places, positions)
    layers, two, _, heads, _, head_dim = cache.shape
    tokens = pool.shape[4]
    if places.numel() == 0:
        return
    _blocks_kernel[(places.numel(), layers * two * heads)](
        pool, cache, places, positions, slot, tokens, head_dim, heads, pool.stride(0), pool.stride(2),
        cache.stride(1), cache.stride(2), cache.stride(3), cache.stride(4), TO_SLOT=to_slot,
        BLOCK_T=min(pow2(tokens), max(1, 4096 // pow2(head_dim))), BLOCK_D=pow2(head_dim), num_warps=4)


def blocks_to_slot(pool: torch.Tensor, cache: torch.Tensor, slot: int, places: torch.Tensor,
                   positions: torch.Tensor) -> None:
    """pool: saved blocks [n, layers, 2, kv_heads, tokens, head_dim]; cache: LinearKVCache.data
    [layers, 2, slots, kv_heads, capacity, head_dim]. Block places[i] of the pool goes to block
    positions[i] of slot `slot` (cache positions positions[i] * tokens ...). places / positions:
    int tensors on the pool's device."""
    _launch(pool, cache, slot, places, positions, True)


def blocks_from_slot(pool: torch.Tensor, cache: torch.Tensor, slot: int, places: torch.Tensor,
                     positions: torch.Tensor) -> None:
    """The other way: block positions[i] of slot `slot` goes to block places[i] of the pool."""
    _launch(pool, cache, slot, places, positions, False)


def _slot_block(cache: torch.Tensor, slot: int, position: int, tokens: int) -> torch.Tensor:
    return cache[:, :, slot, :, position * tokens:(position + 1) * tokens]


def blocks_to_slot_ref(pool: torch.Tensor, cache: torch.Tensor, slot: int, places: torch.Tensor,
                       positions: torch.Tensor) -> None:
    _check(pool, cache, places, positions)
    for place, position in zip(places.tolist(), positions.tolist()):
        _slot_block(cache, slot, position, pool.shape[4]).copy_(pool[place])


def blocks_from_slot_ref(pool: torch.Tensor, cache: torch.Tensor, slot: int, places: torch.Tensor,
                         positions: torch.Tensor) -> None:
    _check(pool, cache, places, positions)
    for place, position in zip(places.tolist(), positions.tolist()):
        pool[place].copy_(_slot_block(cache, slot, position, pool.shape[4]))
