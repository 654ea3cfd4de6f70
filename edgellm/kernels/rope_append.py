"""RoPE and the KV-cache append fused: the attention block's step between the QKV projection and
attention, in one launch.

Kernel: one program per token. It loads cos/sin of the token's position once, rotates the query
heads into a new q, rotates the key heads straight into the cache at the row's slot and position,
and copies the value heads into the cache (padding tokens, index >= lengths[b], write nothing to
the cache). Against apply_rope + kv_append this saves a launch and a write and read of the rotated
keys. The rotation itself is rope.py's.

`positions` (optional, [B, S]) gives each token's rotary position explicitly; the cache position
stays starts[b] + i. A speculative token tree rotates node i at the row's length plus its depth
while storing it at the row's length plus i (tree_mask.py).
"""

import torch

from ._triton import pdl_release, pdl_wait, pow2, tl, triton, use_pdl
from .kv_append import kv_append_ref
from .rope import _rotate_heads, apply_rope_ref


@triton.jit
def _rope_append_kernel(q_ptr, k_ptr, v_ptr, q_out, kc_ptr, vc_ptr, cos_ptr, sin_ptr, slots_ptr, starts_ptr,
                        lens_ptr, positions_ptr, seq_len, n_pos, sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h,
                        c_slot, c_head, c_pos, n_q_heads, n_k_heads, head_dim, half,
                        BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, HALF: tl.constexpr,
                        BLOCK_REST: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
                        POSITIONS: tl.constexpr):
    pdl_wait(PDL)
    token = tl.program_id(0)
    b = (token // seq_len).to(tl.int64)
    s = (token % seq_len).to(tl.int64)
    start = tl.load(starts_ptr + b).to(tl.int64)
    # Padding tokens of a padded chunk may lie past the cache: clamp (their outputs are never used).
    if POSITIONS:
        pos = tl.minimum(tl.load(positions_ptr + token).to(tl.int64), n_pos - 1)
    else:
        pos = tl.minimum(start + s, n_pos - 1)
    f = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_ptr + pos * half + f, mask=f < half, other=1.0)
    sin = tl.load(sin_ptr + pos * half + f, mask=f < half, other=0.0)
    _rotate_heads(q_ptr + b * sq_b + s * sq_s, q_out + token.to(tl.int64) * n_q_heads * head_dim, sq_h, head_dim,
                  n_q_heads, head_dim, half, cos, sin, BLOCK_HQ, HALF, BLOCK_REST)
    pdl_release(PDL)
    if s < tl.load(lens_ptr + b):
        dst = tl.load(slots_ptr + b).to(tl.int64) * c_slot + (start + s) * c_pos
        _rotate_heads(k_ptr + b * sk_b + s * sk_s, kc_ptr + dst, sk_h, c_head, n_k_heads, head_dim, half, cos, sin,
                      BLOCK_HK, HALF, BLOCK_REST)
        heads = tl.arange(0, BLOCK_HK)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (heads < n_k_heads) & (d < head_dim)
        v = tl.load(v_ptr + b * sv_b + s * sv_s + heads * sv_h + d, mask=mask)
        tl.store(vc_ptr + dst + heads * c_head + d, v.to(vc_ptr.dtype.element_ty), mask=mask)


def rope_kv_append(q, k, v, cos, sin, k_cache, v_cache, slots, starts, lengths, positions=None) -> torch.Tensor:
    """Returns the rotated q; writes rotated k and v into the cache (see rope_kv_append_ref)."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError("rope_kv_append: q [B, S, Hq, D], k and v [B, S, Hkv, D] must agree")
    if k_cache.shape[1] != k.shape[2] or k_cache.shape[3] != k.shape[3] or 2 * cos.shape[-1] > q.shape[-1]:
        raise ValueError(f"rope_kv_append: k {tuple(k.shape)} / rotary dim {2 * cos.shape[-1]} do not fit "
                         f"cache {tuple(k_cache.shape)}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    cos, sin = cos.contiguous(), sin.contiguous()
    batch, seq, hq, head_dim = q.shape
    hk, half = k.shape[2], cos.shape[-1]
    q_out = torch.empty(batch, seq, hq, head_dim, dtype=q.dtype, device=q.device)
    if positions is not None:
        if positions.shape != (batch, seq):
            raise ValueError(f"rope_kv_append: positions must be [{batch}, {seq}]")
        positions = positions.contiguous()
    rest = head_dim - 2 * half
    pdl = use_pdl(q)
    _rope_append_kernel[(batch * seq,)](
        q, k, v, q_out, k_cache, v_cache, cos, sin, slots, starts, lengths,
        starts if positions is None else positions, seq, cos.shape[0],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), hq, hk, head_dim, half,
        BLOCK_HQ=pow2(hq), BLOCK_HK=pow2(hk), HALF=pow2(half), BLOCK_REST=pow2(rest) if rest else 0,
        BLOCK_D=pow2(head_dim), PDL=pdl, POSITIONS=positions is not None, num_warps=4, launch_pdl=pdl)
    return q_out


def rope_kv_append_ref(q, k, v, cos, sin, k_cache, v_cache, slots, starts, lengths, positions=None) -> torch.Tensor:
    """q: [B, S, Hq, D], k/v: [B, S, Hkv, D]; row b's token i sits at position starts[b] + i.
    Rotates q and k there (or at positions[b, i] where given; apply_rope_ref), appends the rotated
    k and v of the first lengths[b] tokens to cache slot slots[b] at starts[b] + i (kv_append_ref),
    and returns the rotated q."""
    if positions is None:
        positions = starts.long()[:, None] + torch.arange(q.shape[1], device=q.device)[None, :]
    positions = positions.long().clamp(max=cos.shape[0] - 1)
    q_rot, k_rot = apply_rope_ref(q, k, cos, sin, positions)
    kv_append_ref(k_cache, v_cache, k_rot, v, slots, starts, lengths)
    return q_rot
