"""Write new keys/values into the linear KV cache.

Kernel: one program per (row, token); it copies that token's K and V of every KV head into the
row's cache slot at position starts[row] + token, and does nothing for padding tokens.
"""

import torch

from ._triton import pow2, tl, triton


@triton.jit
def _kv_append_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, starts_ptr, lens_ptr, seq_len,
                      s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, c_slot, c_head, c_pos,
                      n_heads, head_dim, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    if s < tl.load(lens_ptr + b):
        slot = tl.load(slots_ptr + b).to(tl.int64)
        pos = (tl.load(starts_ptr + b) + s).to(tl.int64)
        heads = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < n_heads) & (d < head_dim)
        src_k = k_ptr + b.to(tl.int64) * s_kb + s.to(tl.int64) * s_ks + heads * s_kh + d
        src_v = v_ptr + b.to(tl.int64) * s_vb + s.to(tl.int64) * s_vs + heads * s_vh + d
        dst = slot * c_slot + heads * c_head + pos * c_pos + d
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
    _kv_append_kernel[(batch, seq)](
        k, v, k_cache, v_cache, slots, starts, lengths, seq, k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        heads, head_dim, BLOCK_H=pow2(heads), BLOCK_D=pow2(head_dim))


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
