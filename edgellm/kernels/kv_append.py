"""Write new keys/values into the linear KV cache.

Kernel: one program per (row, group of tokens); its tile's rows are (token, KV head) pairs, copied
into the row's cache slot at position starts[row] + token; padding tokens are not written.
"""

import torch

from ._triton import pow2, tl, triton


@triton.jit
def _kv_append_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, starts_ptr, lens_ptr,
                      s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, c_slot, c_head, c_pos,
                      n_heads, head_dim, TOKENS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    length = tl.load(lens_ptr + b)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    start = tl.load(starts_ptr + b)
    # Rows of the tile are (token, head) pairs of TOKENS consecutive tokens of row b.
    r = tl.arange(0, TOKENS * BLOCK_H)
    s = tl.program_id(1) * TOKENS + r // BLOCK_H
    head = r % BLOCK_H
    d = tl.arange(0, BLOCK_D)
    mask = ((s < length) & (head < n_heads))[:, None] & (d[None, :] < head_dim)
    s64 = s.to(tl.int64)
    src_k = k_ptr + b.to(tl.int64) * s_kb + s64[:, None] * s_ks + head[:, None] * s_kh + d[None, :]
    src_v = v_ptr + b.to(tl.int64) * s_vb + s64[:, None] * s_vs + head[:, None] * s_vh + d[None, :]
    dst = slot * c_slot + head[:, None] * c_head + (start + s64)[:, None] * c_pos + d[None, :]
    tl.store(kc_ptr + dst, tl.load(src_k, mask=mask).to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, tl.load(src_v, mask=mask).to(vc_ptr.dtype.element_ty), mask=mask)


def kv_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              slots: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> None:
    batch, seq, heads, head_dim = k.shape
    if v.shape != k.shape or k_cache.shape[1] != heads or k_cache.shape[3] != head_dim:
        raise ValueError(f"kv_append: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit cache {tuple(k_cache.shape)}")
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    block_h = pow2(heads)
    tokens = max(1, min(128 // block_h, pow2(seq)))
    _kv_append_kernel[(batch, triton.cdiv(seq, tokens))](
        k, v, k_cache, v_cache, slots, starts, lengths, k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        heads, head_dim, TOKENS=tokens, BLOCK_H=block_h, BLOCK_D=pow2(head_dim), num_warps=4)


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
