"""LinearKVCache: one contiguous K/V buffer per batch slot, as in the seeds.

Layout [layers, 2, max_batch + 1, kv_heads, max_seq, head_dim]; `lengths[slot]` is how many positions
of that slot hold valid keys/values. Prefill writes positions [0, n); decode appends at `lengths`.
The last slot (`scratch_slot`) belongs to no request: padding rows of a decode batch (a batch padded
up to the size of a captured CUDA graph) write their throw-away keys there.
"""

from __future__ import annotations

import torch


class LinearKVCache:
    def __init__(self, *, num_layers: int, max_batch_size: int, num_kv_heads: int, capacity: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.capacity = capacity
        self.max_batch_size = max_batch_size
        self.scratch_slot = max_batch_size
        self.data = torch.zeros(num_layers, 2, max_batch_size + 1, num_kv_heads, capacity, head_dim,
                                dtype=dtype, device=device)
        self.lengths = torch.zeros(max_batch_size + 1, dtype=torch.int32, device=device)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one layer, each [max_batch + 1, kv_heads, capacity, head_dim] (views)."""
        return self.data[index, 0], self.data[index, 1]

    def reset(self, slots: torch.Tensor | None = None) -> None:
        """Forget what the given slots (default: all) hold; the buffer itself is not cleared."""
        if slots is None:
            self.lengths.zero_()
        else:
            self.lengths[slots.long()] = 0

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
