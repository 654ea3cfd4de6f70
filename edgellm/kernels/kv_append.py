"""Write new keys/values into the linear KV cache."""

import torch


def kv_append_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  slots: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> None:
    """In place: for each batch row b, write its first lengths[b] tokens of k/v at positions
    starts[b] .. starts[b] + lengths[b] - 1 of cache slot slots[b].

    k_cache, v_cache: [max_batch, Hkv, max_seq, D]; k, v: [B, S, Hkv, D]; slots/starts/lengths: [B].
    Padding tokens (index >= lengths[b]) are not written.
    """
    for b, (slot, start, n) in enumerate(zip(slots.tolist(), starts.tolist(), lengths.tolist())):
        k_cache[slot, :, start:start + n] = k[b, :n].transpose(0, 1).to(k_cache.dtype)
        v_cache[slot, :, start:start + n] = v[b, :n].transpose(0, 1).to(v_cache.dtype)
