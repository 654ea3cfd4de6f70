"""The KV store's memory tiers: saved blocks in one preallocated buffer, least-recently-used over keys,
on the device (the "gpu" tier) or in pinned host memory (the "host" tier).

Why one buffer instead of a tensor per block: a prompt that reuses n saved blocks is then one gather
(index_select) and one copy into the cache slot. With a tensor per block the same hit was a cat of
n tensors and a copy: on the H100, 31 blocks cost 324 us of host time that way against 54 us for the
gather.

Layout [capacity, layers, 2, kv_heads, block_tokens, head_dim]: each block is contiguous, so a block
demoted to the host is one plain DMA into its place. The host tier is one buffer for the same reason
the device tier is, and one more: a pinned buffer that lives as long as the store can be read by the
prefill step's CUDA graph itself (kernels/kv_blocks.py reads it across PCIe, layer by layer, while the
earlier layers compute), which per-block tensors made and freed per request could not.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch


class BlockPool:
    """`budget` bytes of blocks on `device`; pinned: in pinned host memory (device "cpu"), for a CUDA
    engine's host tier."""

    def __init__(self, budget: int, layout: list[int], dtype: torch.dtype, device: torch.device,
                 pinned: bool = False):
        self.capacity = budget // (math.prod(layout) * torch.empty(0, dtype=dtype).element_size())
        self.data = torch.empty(self.capacity, *layout, dtype=dtype, device=device, pin_memory=pinned)
        self.where: OrderedDict[bytes, int] = OrderedDict()  # key -> index in `data`, oldest use first
        self._free = list(range(self.capacity - 1, -1, -1))
        self._reading: dict[int, torch.cuda.Event] = {}  # index -> a side-stream copy still reading it

    def __contains__(self, key: bytes) -> bool:
        return key in self.where

    def take(self, key: bytes) -> int | None:
        """Forget a block (it moved to another tier); its place is free for the next allocate."""
        index = self.where.pop(key, None)
        if index is not None:
            self._free.append(index)
        return index

    def get(self, key: bytes) -> int | None:
        """The block's index (now the most recently used), or None."""
        index = self.where.get(key)
        if index is not None:
            self.where.move_to_end(key)
        return index

    def reading(self, index: int, event) -> None:
        """A copy on another stream reads block `index` until `event`: the block is not overwritten before."""
        if event is not None:
            self._reading[index] = event

    def allocate(self, key: bytes) -> tuple[int, tuple[bytes, int] | None]:
        """A place for a new block (the most recently used) and the (key, index) evicted to make room, if
        any: the caller copies the evicted block out before it writes the new one on the same stream."""
        evicted = None
        if self._free:
            index = self._free.pop()
        else:
            old_key, index = self.where.popitem(last=False)
            evicted = (old_key, index)
        pending = self._reading.pop(index, None)
        if pending is not None:  # the compute stream waits for that copy before it writes here
            torch.cuda.current_stream(self.data.device).wait_event(pending)
        self.where[key] = index
        return index, evicted
