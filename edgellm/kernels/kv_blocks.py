"""Saved KV blocks in and out of cache slots in one pass (engine/kv_store.py's memory tiers).

A saved block holds block_tokens positions of every layer, K and V, and KV head, contiguous:
[layers, 2, kv_heads, tokens, head_dim] (engine/kv_pool.py). In the cache slot the same positions lie
in [layers, 2, slots, kv_heads, capacity, head_dim], so each (layer, K/V, head) of a block is one
contiguous run of tokens x head_dim values on both sides. Torch needs two passes for a hit (a gather
from the pool, then a copy into the slot's permuted view, 0.12 ms for 31 blocks of the Llama-3.2-1B
shape on the H100, the copy at 1.4 TB/s); this kernel copies each run once, the block's place looked
up in the kernel.

Which blocks go where is a *block table* on the device, int32: [n, then n triples (place in the pool,
block position in the slot, slot)] (block_table builds one). The count is read on the device, so a
table with room for more entries than it holds (its size) can be filled after the launch was
recorded: the prefill graph copies a KV hit's blocks itself, the table loaded with the step's other
integers (engine/prefill_steps.py), which spares the hit a launch and a copy of its own from the
host.

Kernel: a grid of (layer x K/V x head, SPLIT); program (run, s) copies the run of table entries s,
s + SPLIT, ..., BLOCK_T tokens at a time. Entries past n cost nothing but the empty programs.
"""

import torch

from ._triton import pow2, tl, triton

SPLIT = 16  # programs per (layer, K/V, head): enough for a whole prompt's blocks in one wave


def block_table(entries) -> list[int]:
    """A block table as a list: entries are (place, position, slot) triples."""
    table = [len(entries)]
    for entry in entries:
        table += entry
    return table


@triton.jit
def _blocks_kernel(pool_ptr, cache_ptr, table_ptr, tokens, head_dim, n_heads, first_plane,
                   s_block, s_plane_pool, s_plane_cache, s_slot, s_head, s_pos,
                   TO_SLOT: tl.constexpr, SPLIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    run = tl.program_id(0)  # layer x K/V x head (of the layers copied)
    plane = first_plane + run // n_heads
    head = run % n_heads
    n = tl.load(table_ptr)
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    for i in range(tl.program_id(1), n, SPLIT):
        place = tl.load(table_ptr + 1 + 3 * i).to(tl.int64)
        first = tl.load(table_ptr + 2 + 3 * i).to(tl.int64) * tokens  # the block's first position in the slot
        slot = tl.load(table_ptr + 3 + 3 * i).to(tl.int64)
        pool_run = pool_ptr + place * s_block + plane.to(tl.int64) * s_plane_pool \
            + head.to(tl.int64) * tokens * head_dim
        cache_run = cache_ptr + plane.to(tl.int64) * s_plane_cache + slot * s_slot + head.to(tl.int64) * s_head
        for t0 in range(0, tokens, BLOCK_T):
            rows = t0 + t
            ok = (rows < tokens)[:, None] & (d < head_dim)[None, :]
            at_pool = pool_run + rows[:, None] * head_dim + d[None, :]
            at_cache = cache_run + (first + rows)[:, None] * s_pos + d[None, :]
            if TO_SLOT:
                tl.store(at_cache, tl.load(at_pool, mask=ok), mask=ok)
            else:
                tl.store(at_pool, tl.load(at_cache, mask=ok), mask=ok)


def _check(pool: torch.Tensor, cache: torch.Tensor, table: torch.Tensor) -> int:
    """The table's entry room (as many entries as its size holds), once the arguments are checked."""
    layers, two, _, heads, _, head_dim = cache.shape
    if pool.dim() != 6 or tuple(pool.shape[1:4]) != (layers, two, heads) or pool.shape[5] != head_dim \
            or not pool.is_contiguous() or pool.dtype != cache.dtype:
        raise ValueError(f"kv_blocks: pool {tuple(pool.shape)} {pool.dtype} is not contiguous blocks of cache "
                         f"{tuple(cache.shape)} {cache.dtype}")
    if cache.stride(-1) != 1 or cache.stride(0) != 2 * cache.stride(1):
        raise ValueError("kv_blocks: the cache must be LinearKVCache.data (contiguous planes)")
    if table.dim() != 1 or table.dtype != torch.int32 or table.numel() < 1:
        raise ValueError(f"kv_blocks: the block table must be int32 [1 + 3 x entries], got "
                         f"{table.dtype} {tuple(table.shape)}")
    return (table.numel() - 1) // 3


def _launch(pool, cache, table, to_slot: bool, layer: int | None = None, split: int = SPLIT) -> None:
    max_blocks = _check(pool, cache, table)
    layers, two, _, heads, _, head_dim = cache.shape
    tokens = pool.shape[4]
    if layer is not None and not 0 <= layer < layers:
        raise ValueError(f"kv_blocks: layer {layer} is not one of the cache's {layers}")
    if max_blocks == 0:
        return
    split = max(1, min(split, max_blocks))
    _blocks_kernel[((layers if layer is None else 1) * two * heads, split)](
        pool, cache, table, tokens, head_dim, heads, 0 if layer is None else two * layer, pool.stride(0), pool.stride(2),
        cache.stride(1), cache.stride(2), cache.stride(3), cache.stride(4), TO_SLOT=to_slot, SPLIT=split,
        BLOCK_T=min(pow2(tokens), max(1, 4096 // pow2(head_dim))), BLOCK_D=pow2(head_dim), num_warps=4)


def blocks_to_slot(pool: torch.Tensor, cache: torch.Tensor, table: torch.Tensor, layer: int | None = None,
                   split: int = SPLIT) -> None:
    """pool: saved blocks [n, layers, 2, kv_heads, tokens, head_dim]; cache: LinearKVCache.data
    [layers, 2, slots, kv_heads, capacity, head_dim]; table: a block table on the cache's device (its
    count at most the entries its size holds). Pool block `place` goes to block
    `position` (cache positions position * tokens ...) of slot `slot`, for each entry.
    layer: copy that layer only (default: all). split: programs per (layer, K/V, head).
    The pool may be pinned host memory (the KV store's host tier): the kernel then reads it across
    PCIe itself, so a copy inside a CUDA graph needs no DMA of its own (engine/prefill_steps.py)."""
    _launch(pool, cache, table, True, layer, split)


def blocks_from_slot(pool: torch.Tensor, cache: torch.Tensor, table: torch.Tensor) -> None:
    """The other way: block `position` of slot `slot` goes to pool block `place`, for each entry."""
    _launch(pool, cache, table, False)


def _entries(table: torch.Tensor) -> list[list[int]]:
    values = table.tolist()
    return [values[1 + 3 * i:4 + 3 * i] for i in range(values[0])]


def _slot_block(cache: torch.Tensor, slot: int, position: int, tokens: int) -> torch.Tensor:
    return cache[:, :, slot, :, position * tokens:(position + 1) * tokens]


def blocks_to_slot_ref(pool: torch.Tensor, cache: torch.Tensor, table: torch.Tensor, layer: int | None = None,
                       split: int = SPLIT) -> None:
    _check(pool, cache, table)
    layers = slice(None) if layer is None else slice(layer, layer + 1)
    for place, position, slot in _entries(table):
        _slot_block(cache, slot, position, pool.shape[4])[layers].copy_(pool[place, layers].to(cache.device))


def blocks_from_slot_ref(pool: torch.Tensor, cache: torch.Tensor, table: torch.Tensor) -> None:
    _check(pool, cache, table)
    for place, position, slot in _entries(table):
        pool[place].copy_(_slot_block(cache, slot, position, pool.shape[4]))
