"""The neighbours of a decode step's GEMV that run inside it (kernels/gemv.py: norm=, glu=, residual=,
rope_append=): the RMSNorm of x on the way in, and RoPE + the KV append of a qkv projection on the way
out, each computing what its separate kernel (rms_norm.py, rope_append.py) computes; plus the checks of
what the launcher was asked to fuse. (SiLU * up and the residual add are a line each, in the kernel.)
No op of its own, so no `_ref` here: the fused GEMV's reference is gemv.gemv_ref, which runs rms_norm_ref,
glu_ref and rope_kv_append_ref around the plain projection."""

from typing import NamedTuple

import torch

from ._triton import tl, triton
from .glu import GATE_ACTIVATIONS


@triton.jit
def load_x(ptrs, mask, nw_ptrs, nw_mask, rstd, NORM: tl.constexpr):
    """Loads x; NORM: RMSNorm-ed as kernels/rms_norm.py rounds it (normalised in float32, cast to x's
    dtype, times the norm weight), so a GEMV with the norm in front reads what the norm kernel would
    have written."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if NORM:
        x = (x.to(tl.float32) * rstd).to(x.dtype) * tl.load(nw_ptrs, mask=nw_mask, other=0.0)
    return x


@triton.jit
def row_rstd(x_base, m_ok, k, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of each row of x [BLOCK_M], in float32: a pass over x (from L2: the
    kernel before just wrote it) before the K loop."""
    cols = tl.arange(0, BLOCK_K)
    sq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        kk = k0 + cols
        x = tl.load(x_base + kk[None, :], mask=m_ok[:, None] & (kk < k)[None, :], other=0.0).to(tl.float32)
        sq += x * x
    return 1.0 / tl.sqrt(tl.sum(sq, axis=1) / k + eps)


@triton.jit
def sum_in_order(parts, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """parts [BLOCK_P, BLOCK_M] (BLOCK_P a power of two up to 1024) summed over axis 0 as one fixed tree:
    the first half plus the second, again and again. A tl.sum adds in an order its layout decides, and
    the layout follows the pointers' strides, which change with the batch size (one row's is specialised
    as 1): a row's rounding would then depend on the rows around it. Each level adds two values, which
    gives the same bits in either order."""
    tl.static_assert(BLOCK_P <= 1024)
    for level in tl.static_range(1, 11):  # (unrolled: each level's shape is known when it compiles)
        if BLOCK_P >> level > 0:
            parts = tl.sum(tl.reshape(parts, [2, BLOCK_P >> level, BLOCK_M]), axis=0)
    return tl.reshape(parts, [BLOCK_M])


@triton.jit
def rope_operands(rows_m, m_ok, cos_ptr, sin_ptr, slots_ptr, starts_ptr, lens_ptr, seq_len, n_pos, half, n_pairs,
                   BLOCK_N: tl.constexpr):
    """What the rope_append epilogue needs besides the tile, loaded before the K loop so that these
    dependent loads (the row's start, then its cos/sin) overlap the weight stream: cos and sin of each
    token's position and pair [BLOCK_M, BLOCK_N // 2], each token's cache offset, whether it writes."""
    pair = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    b = rows_m // seq_len
    s = rows_m % seq_len
    start = tl.load(starts_ptr + b, mask=m_ok, other=0)
    pos = tl.maximum(tl.minimum(start + s, n_pos - 1), 0)
    at = pos.to(tl.int64)[:, None] * half + (pair % half)[None, :]
    ok = m_ok[:, None] & (pair < n_pairs)[None, :]
    cos = tl.load(cos_ptr + at, mask=ok, other=1.0)
    sin = tl.load(sin_ptr + at, mask=ok, other=0.0)
    live = m_ok & (s < tl.load(lens_ptr + b, mask=m_ok, other=0))
    slot = tl.load(slots_ptr + b, mask=m_ok, other=0).to(tl.int64)
    return cos, sin, slot, (start + s).to(tl.int64), live


@triton.jit
def rope_append_epilogue(out, rows_m, m_ok, q_ptr, s_qm, cos, sin, slot, cache_pos, live, kc_ptr, vc_ptr, half,
                          n_q, n_kv, n_pairs, c_slot, c_head, c_pos, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The qkv projection's tile [BLOCK_M tokens, BLOCK_N // 2 pairs (d, d + half) of one head's features]
    as kernels/rope_append.py handles it: query and key pairs rotated at the token's position (fp32,
    rounded), queries stored to q, keys and values appended to the cache at the row's slot (tokens
    past the row's length write nothing)."""
    x1, x2 = tl.split(tl.reshape(out, [BLOCK_M, BLOCK_N // 2, 2]))
    pair = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    head = pair // half  # over the query, key and value heads in turn
    d = pair % half
    pair_ok = pair < n_pairs
    a, c = x1.to(tl.float32), x2.to(tl.float32)
    rotated = (head < n_q + n_kv)[None, :]
    y1 = tl.where(rotated, a * cos - c * sin, a).to(out.dtype)
    y2 = tl.where(rotated, c * cos + a * sin, c).to(out.dtype)
    is_q = (head < n_q)[None, :] & pair_ok[None, :] & m_ok[:, None]
    q_at = q_ptr + rows_m[:, None] * s_qm + (head * 2 * half + d)[None, :]
    tl.store(q_at, y1, mask=is_q)
    tl.store(q_at + half, y2, mask=is_q)
    is_v = head >= n_q + n_kv
    kv_head = tl.where(is_v, head - n_q - n_kv, head - n_q)
    dst = (slot * c_slot + cache_pos * c_pos)[:, None] + (kv_head.to(tl.int64) * c_head + d)[None, :]
    keep = live[:, None] & pair_ok[None, :] & (head >= n_q)[None, :]
    is_k = keep & ~is_v[None, :]
    tl.store(kc_ptr + dst, y1.to(kc_ptr.dtype.element_ty), mask=is_k)
    tl.store(kc_ptr + dst + half, y2.to(kc_ptr.dtype.element_ty), mask=is_k)
    keep_v = keep & is_v[None, :]
    tl.store(vc_ptr + dst, y1.to(vc_ptr.dtype.element_ty), mask=keep_v)
    tl.store(vc_ptr + dst + half, y2.to(vc_ptr.dtype.element_ty), mask=keep_v)


class RopeAppend(NamedTuple):
    """What gemv(..., rope_append=) needs to finish a qkv projection as kernels/rope_append.py does:
    rotary tables [positions, head_dim / 2] (the whole head rotates), the layer's key and value caches
    [slots, kv_heads, capacity, head_dim], each row's cache slot, start position and token count [B]."""
    cos: torch.Tensor
    sin: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slots: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    q_heads: int


def check_fusions(x, weight, lora, norm, glu, residual, lead, n, rope_append=None) -> None:
    if lora is not None and (norm is not None or glu is not None or residual is not None or rope_append is not None):
        raise ValueError("gemv: the LoRA epilogue does not combine with norm, glu, residual or rope_append")
    if rope_append is not None:
        r = rope_append
        head_dim = r.k_cache.shape[-1]
        kv_heads = r.k_cache.shape[1]
        if glu is not None or residual is not None:
            raise ValueError("gemv: rope_append does not combine with glu or residual")
        if x.dim() != 3 or r.slots.shape != (x.shape[0],) or r.v_cache.shape != r.k_cache.shape \
                or 2 * r.cos.shape[-1] != head_dim or weight.shape[0] != (r.q_heads + 2 * kv_heads) * head_dim:
            raise ValueError(f"gemv: rope_append needs x [B, S, K], per-row slots, a rotary dim equal to the head "
                             f"dim and q/k/v rows of weight; got x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                             f"cache {tuple(r.k_cache.shape)}, rotary dim {2 * r.cos.shape[-1]}")
    if glu is not None:
        if glu not in GATE_ACTIVATIONS:
            raise ValueError(f"gemv: unknown glu activation {glu!r}; supported: {', '.join(GATE_ACTIVATIONS)}")
        if weight.shape[0] % 2:
            raise ValueError(f"gemv: glu needs gate rows then up rows, got {weight.shape[0]} rows")
        if residual is not None:
            raise ValueError("gemv: glu and residual do not combine")
    if norm is not None and norm[0].shape != (x.shape[-1],):
        raise ValueError(f"gemv: norm weight {tuple(norm[0].shape)} does not match x {tuple(x.shape)}")
    if residual is not None and (tuple(residual.shape) != (*lead, n) or residual.dtype != x.dtype):
        raise ValueError(f"gemv: residual {tuple(residual.shape)} {residual.dtype} must be {(*lead, n)} {x.dtype}")


def check_sums(rows: int, programs: int, norm, norm_sumsq, sumsq_out, rope_append) -> None:
    """gemv's norm_sumsq / sumsq_out: [parts, rows] float32, zeroed by the caller, whose parts add up to
    each row's sum of squares (sumsq_out: at least one part per program, gemv.sumsq_parts: each program
    stores its own, so the sum comes out in one order, whatever order the programs ran in); norm_sumsq
    only with a norm, sumsq_out not with the rope epilogue (which stores queries and cache entries, not a
    row of the stream)."""
    for name, t in (("norm_sumsq", norm_sumsq), ("sumsq_out", sumsq_out)):
        if t is not None and (t.dim() != 2 or t.shape[1] != rows or t.dtype != torch.float32 or t.stride(1) != 1):
            raise ValueError(f"gemv: {name} must be float32 [parts, {rows}] with contiguous rows, "
                             f"got {tuple(t.shape)} {t.dtype}")
    if sumsq_out is not None and sumsq_out.shape[0] < programs:
        raise ValueError(f"gemv: sumsq_out needs a part for each of its {programs} programs, got {sumsq_out.shape[0]}")
    if norm_sumsq is not None and norm is None:
        raise ValueError("gemv: norm_sumsq is the norm's input statistics; it needs norm=")
    if sumsq_out is not None and rope_append is not None:
        raise ValueError("gemv: sumsq_out does not combine with rope_append")
