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

Multimodal RoPE (Qwen2-VL): `positions` [B, S, 3] gives each token a (t, h, w) position and
`sections` (a, b, c), a + b + c = rotary_dim / 2, says which frequencies turn with which: the first a
with t, the next b with h, the last c with w (a text token has t = h = w). `offsets` [slots] adds a
per-slot shift to 1-D and implicit positions: after a prompt with images, text positions run behind
the cache positions by a fixed delta, which decode steps (CUDA graphs included) read from there.
"""

import torch

from ._triton import pdl_release, pdl_wait, pow2, tl, triton, use_pdl
from .kv_append import kv_append_ref
from .rope import rotate_pairs, _rotate_heads, apply_rope_ref


@triton.jit
def _rope_append_kernel(q_ptr, k_ptr, v_ptr, q_out, kc_ptr, vc_ptr, cos_ptr, sin_ptr, slots_ptr, starts_ptr,
                        lens_ptr, positions_ptr, seq_len, n_pos, sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h,
                        c_slot, c_head, c_pos, n_q_heads, n_k_heads, head_dim, half,
                        BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, HALF: tl.constexpr,
                        BLOCK_REST: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
                        POSITIONS: tl.constexpr, offsets_ptr, sec_t, sec_th, OFFSETS: tl.constexpr):
    pdl_wait(PDL)
    token = tl.program_id(0)
    b = (token // seq_len).to(tl.int64)
    s = (token % seq_len).to(tl.int64)
    start = tl.load(starts_ptr + b).to(tl.int64)
    f = tl.arange(0, HALF)[None, :]
    # Padding tokens of a padded chunk may lie past the cache: clamp (their outputs are never used).
    if POSITIONS == 2:  # (t, h, w): each frequency turns with its section's coordinate
        p = positions_ptr + token.to(tl.int64) * 3
        pos_t, pos_h, pos_w = tl.load(p).to(tl.int64), tl.load(p + 1).to(tl.int64), tl.load(p + 2).to(tl.int64)
        pos = tl.where(f < sec_t, pos_t, tl.where(f < sec_th, pos_h, pos_w))
    elif POSITIONS == 1:
        pos = tl.load(positions_ptr + token).to(tl.int64)
    else:
        pos = start + s
    if OFFSETS:
        pos += tl.load(offsets_ptr + tl.load(slots_ptr + b)).to(tl.int64)
    pos = tl.maximum(tl.minimum(pos, n_pos - 1), 0)
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


def _check_positions(positions, offsets, sections, batch, seq, half):
    if positions is not None and positions.shape not in ((batch, seq), (batch, seq, 3)):
        raise ValueError(f"rope_kv_append: positions must be [{batch}, {seq}] or [{batch}, {seq}, 3]")
    three = positions is not None and positions.dim() == 3
    if three and (sections is None or len(sections) != 3 or sum(sections) != half):
        raise ValueError(f"rope_kv_append: 3-D positions need sections (t, h, w) summing to {half}")
    if three and offsets is not None:
        raise ValueError("rope_kv_append: 3-D positions are absolute; offsets apply to 1-D positions only")
    return three


def rope_kv_append(q, k, v, cos, sin, k_cache, v_cache, slots, starts, lengths, positions=None, offsets=None,
                   sections=None) -> torch.Tensor:
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
    three = _check_positions(positions, offsets, sections, batch, seq, half)
    if positions is not None:
        positions = positions.contiguous()
    sec_t, sec_th = (sections[0], sections[0] + sections[1]) if three else (0, 0)
    rest = head_dim - 2 * half
    pdl = use_pdl(q)
    _rope_append_kernel[(batch * seq,)](
        q, k, v, q_out, k_cache, v_cache, cos, sin, slots, starts, lengths,
        starts if positions is None else positions, seq, cos.shape[0],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), hq, hk, head_dim, half,
        BLOCK_HQ=pow2(hq), BLOCK_HK=pow2(hk), HALF=pow2(half), BLOCK_REST=pow2(rest) if rest else 0,
        BLOCK_D=pow2(head_dim), PDL=pdl, POSITIONS=0 if positions is None else positions.dim() - 1,
        offsets_ptr=starts if offsets is None else offsets, sec_t=sec_t, sec_th=sec_th, OFFSETS=offsets is not None,
        num_warps=4, launch_pdl=pdl > 0)
    return q_out


def rope_kv_append_ref(q, k, v, cos, sin, k_cache, v_cache, slots, starts, lengths, positions=None, offsets=None,
                       sections=None) -> torch.Tensor:
    """q: [B, S, Hq, D], k/v: [B, S, Hkv, D]; row b's token i sits at position starts[b] + i.
    Rotates q and k there (or at positions[b, i] where given, plus offsets[slots[b]] where given;
    apply_rope_ref), appends the rotated k and v of the first lengths[b] tokens to cache slot slots[b]
    at starts[b] + i (kv_append_ref), and returns the rotated q. 3-D positions [B, S, 3]: frequency f
    of the rotary half turns at positions[b, i, c], c the section (of `sections`) f falls in."""
    batch, seq = q.shape[:2]
    if _check_positions(positions, offsets, sections, batch, seq, cos.shape[-1]):
        which = torch.repeat_interleave(torch.arange(3, device=q.device), torch.tensor(sections, device=q.device))
        per_freq = positions.long()[..., which].clamp(0, cos.shape[0] - 1)  # [B, S, half]
        freq = torch.arange(cos.shape[-1], device=q.device)
        c, s = cos[per_freq, freq][:, :, None, :], sin[per_freq, freq][:, :, None, :]
        q_rot, k_rot = rotate_pairs(q, c.to(q.dtype), s.to(q.dtype)), rotate_pairs(k, c.to(k.dtype), s.to(k.dtype))
        kv_append_ref(k_cache, v_cache, k_rot, v, slots, starts, lengths)
        return q_rot
    if positions is None:
        positions = starts.long()[:, None] + torch.arange(seq, device=q.device)[None, :]
    positions = positions.long()
    if offsets is not None:
        positions = positions + offsets.long()[slots.long()][:, None]
    positions = positions.clamp(0, cos.shape[0] - 1)
    q_rot, k_rot = apply_rope_ref(q, k, cos, sin, positions)
    kv_append_ref(k_cache, v_cache, k_rot, v, slots, starts, lengths)
    return q_rot
