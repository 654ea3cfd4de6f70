"""Write new keys/values into the linear KV cache.

Kernel: one program per (row, KV head, block of tokens). The cache keeps a head's positions
contiguous, so each program writes one contiguous run of TOKENS * head_dim values per tensor
(reads are head_dim-long runs, one per token). Padding tokens are not written.
"""

import torch

from ._triton import pow2, tl, triton


@triton.jit
def _kv_append_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, starts_ptr, lens_ptr,
                      s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, c_slot, c_head, c_pos, seq_len,
                      n_heads, head_dim, TOKENS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // n_heads
    b64 = b.to(tl.int64)
    head = (pid % n_heads).to(tl.int64)
    s = tl.program_id(1) * TOKENS + tl.arange(0, TOKENS)
    d = tl.arange(0, BLOCK_D)[None, :]
    s64 = s.to(tl.int64)[:, None]
    # The loads of k/v do not wait for the row's length, slot and start (bounded by the chunk's
    # seq_len instead): all of a program's reads are in flight at once; the store applies the length.
    in_chunk = (s < seq_len)[:, None] & (d < head_dim)
    k = tl.load(k_ptr + b64 * s_kb + s64 * s_ks + head * s_kh + d, mask=in_chunk)
    v = tl.load(v_ptr + b64 * s_vb + s64 * s_vs + head * s_vh + d, mask=in_chunk)
    length = tl.load(lens_ptr + b)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    start = tl.load(starts_ptr + b)
    mask = in_chunk & (s < length)[:, None]
    dst = slot * c_slot + head * c_head + (start + s64) * c_pos + d
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def kv_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slots: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
              tokens: int | None = None, num_warps: int = 4) -> None:
    batch, seq, heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.shape[1] != heads or k_cache.shape[3] != head_dim:
        raise ValueError(f"kv_append: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit cache {tuple(k_cache.shape)}")
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    tokens = tokens or min(64, pow2(seq))
    _kv_append_kernel[(batch * heads, triton.cdiv(seq, tokens))](
        k, v, k_cache, v_cache, slots, starts, lengths, k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), seq,
        heads, head_dim, TOKENS=tokens, BLOCK_D=pow2(head_dim), num_warps=num_warps)


def kv_append_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  slots: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> None:
    """In place: for each batch row b, write its first lengths[b] tokens of k/v at positions
    starts[b] .. starts[b] + lengths[b] - 1 of cache slot slots[b].

    k_cache, v_cache: [max_batch, Hkv, max_seq, D]; k, v: [B, S, Hkv, D]; slots/starts/lengths: [B].
    Padding tokens (index >= lengths[b]) are not written.
    """
    if k.shape[1] == 1:  # decode: one token a row, written without a host loop (compile-friendly)
        rows, positions = slots.long(), starts.long()
        write = (lengths > 0)[:, None, None]
        k_cache[rows, :, positions] = torch.where(write, k[:, 0].to(k_cache.dtype), k_cache[rows, :, positions])
        v_cache[rows, :, positions] = torch.where(write, v[:, 0].to(v_cache.dtype), v_cache[rows, :, positions])
        return
    for b, (slot, start, n) in enumerate(zip(slots.tolist(), starts.tolist(), lengths.tolist())):
        k_cache[slot, :, start:start + n] = k[b, :n].transpose(0, 1).to(k_cache.dtype)
        v_cache[slot, :, start:start + n] = v[b, :n].transpose(0, 1).to(v_cache.dtype)
