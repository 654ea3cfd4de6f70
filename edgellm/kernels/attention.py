"""Causal GQA attention over the linear KV cache: prefill (many queries per row) and decode (one)."""

import torch


def _row_attention(q, keys, values, first_position: int, scale: float):
    """q: [S, Hq, D]; keys/values: [Hkv, L, D] with L = first_position + S. Causal, float32 math."""
    s, hq, _ = q.shape
    hkv, length, _ = keys.shape
    group = hq // hkv
    keys = keys.float().repeat_interleave(group, dim=0)
    values = values.float().repeat_interleave(group, dim=0)
    scores = torch.einsum("shd,hld->hsl", q.float(), keys) * scale
    query_pos = first_position + torch.arange(s, device=q.device)
    key_pos = torch.arange(length, device=q.device)
    scores = scores.masked_fill(key_pos[None, None, :] > query_pos[None, :, None], float("-inf"))
    return torch.einsum("hsl,hld->shd", scores.softmax(-1), values)


def prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slots: torch.Tensor, starts: torch.Tensor, q_lens: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """q: [B, S, Hq, D], right-padded; row b has q_lens[b] real queries at positions starts[b]...

    Row b's query i attends to keys 0 .. starts[b] + i of cache slot slots[b] (its keys for this
    chunk must already be appended). Returns [B, S, Hq, D] in q's dtype; padded queries give 0.
    """
    out = torch.zeros_like(q)
    for b, (slot, start, n) in enumerate(zip(slots.tolist(), starts.tolist(), q_lens.tolist())):
        keys = k_cache[slot, :, :start + n]
        values = v_cache[slot, :, :start + n]
        out[b, :n] = _row_attention(q[b, :n], keys, values, start, scale).to(q.dtype)
    return out


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slots: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, Hq, D], one query per row at position lengths[b] - 1 (its key already appended);
    attends to keys 0 .. lengths[b] - 1 of slot slots[b]. Returns [B, Hq, D] in q's dtype."""
    out = torch.empty_like(q)
    for b, (slot, n) in enumerate(zip(slots.tolist(), lengths.tolist())):
        row = _row_attention(q[b, None], k_cache[slot, :, :n], v_cache[slot, :, :n], n - 1, scale)
        out[b] = row[0].to(q.dtype)
    return out
