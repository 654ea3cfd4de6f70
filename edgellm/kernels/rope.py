"""Rotary position embedding: frequencies, the cos/sin cache, and its application to q and k.

Convention: HF "rotate_half" (GPT-NeoX) layout; only the first `rotary_dim` features of each head
rotate (partial rotary), the rest pass through. The cache holds cos/sin of position * inv_freq in
float32, shape [max_positions, rotary_dim // 2].
"""

from __future__ import annotations

import math

import torch

from ._triton import pow2, tl, triton

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def rope_inv_freq(rotary_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies [rotary_dim // 2] (float32), with optional linear or Llama-3 scaling.

    `scaling` uses HF's keys: rope_type, factor, and for llama3 low_freq_factor, high_freq_factor,
    original_max_position_embeddings.
    """
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (theta ** exponents)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        # Between the two wavelength bounds, blend the scaled and unscaled frequency smoothly.
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    if rope_type == "longrope":
        raise ValueError("longrope has two frequency sets: use longrope_inv_freqs")
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def longrope_inv_freqs(rotary_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LongRoPE (Phi-3 128k, Phi-4-mini): (short inverse frequencies, long ones, attention factor).
    Each frequency is divided by its short_factor / long_factor entry; cos and sin are multiplied by
    the attention factor (default sqrt(1 + ln(factor) / ln(original length)), factor = the context
    extension). Which set a token uses is the engine's business (engine/runner.py)."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    base = theta ** exponents
    short = 1.0 / (torch.tensor(scaling["short_factor"], dtype=torch.float32) * base)
    long = 1.0 / (torch.tensor(scaling["long_factor"], dtype=torch.float32) * base)
    factor, original = float(scaling["factor"]), float(scaling["original_max_position_embeddings"])
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return short, long, float(attention)


@triton.jit
def _cos_sin_kernel(inv_freq_ptr, cos_ptr, sin_ptr, n_pos, half, BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr):
    pos = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    freq_idx = tl.arange(0, BLOCK_F)
    inv_freq = tl.load(inv_freq_ptr + freq_idx, mask=freq_idx < half, other=0.0)
    angles = pos.to(tl.float32)[:, None] * inv_freq[None, :]
    offs = pos[:, None] * half + freq_idx[None, :]
    mask = (pos[:, None] < n_pos) & (freq_idx[None, :] < half)
    tl.store(cos_ptr + offs, tl.cos(angles), mask=mask)
    tl.store(sin_ptr + offs, tl.sin(angles), mask=mask)


def rope_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int):
    inv_freq = inv_freq.float().contiguous()
    half = inv_freq.numel()
    cos = torch.empty(max_positions, half, dtype=torch.float32, device=inv_freq.device)
    sin = torch.empty_like(cos)
    block_p = 32
    _cos_sin_kernel[(triton.cdiv(max_positions, block_p),)](inv_freq, cos, sin, max_positions, half,
                                                             BLOCK_P=block_p, BLOCK_F=pow2(half))
    return cos, sin


@triton.jit
def _rotate_heads(x_base, out_base, stride_h, out_stride_h, n_heads, head_dim, half, cos, sin,
                  BLOCK_H: tl.constexpr, HALF: tl.constexpr, BLOCK_REST: tl.constexpr):
    """Rotate one token's heads: rows are heads, the two halves of the rotary part are loaded as
    separate tiles (each element read once), and the non-rotary tail (partial rotary) is copied."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    f = tl.arange(0, HALF)[None, :]
    mask = (heads < n_heads) & (f < half)
    src = x_base + heads * stride_h + f
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    dst = out_base + heads * out_stride_h + f
    dtype = out_base.dtype.element_ty
    tl.store(dst, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(dst + half, (x2 * cos + x1 * sin).to(dtype), mask=mask)
    if BLOCK_REST > 0:
        r = 2 * half + tl.arange(0, BLOCK_REST)[None, :]
        rest_mask = (heads < n_heads) & (r < head_dim)
        tl.store(out_base + heads * out_stride_h + r, tl.load(x_base + heads * stride_h + r, mask=rest_mask),
                 mask=rest_mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, q_out, k_out, cos_ptr, sin_ptr, pos_ptr, seq_len,
                 sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, n_q_heads, n_k_heads, head_dim, half,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, HALF: tl.constexpr, BLOCK_REST: tl.constexpr):
    # One program per token rotates its query heads and its key heads with one cos/sin load.
    token = tl.program_id(0)
    b = (token // seq_len).to(tl.int64)
    s = (token % seq_len).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    f = tl.arange(0, HALF)[None, :]
    cos = tl.load(cos_ptr + pos * half + f, mask=f < half, other=1.0)
    sin = tl.load(sin_ptr + pos * half + f, mask=f < half, other=0.0)
    t64 = token.to(tl.int64)
    _rotate_heads(q_ptr + b * sq_b + s * sq_s, q_out + t64 * n_q_heads * head_dim, sq_h, head_dim, n_q_heads,
                  head_dim, half, cos, sin, BLOCK_HQ, HALF, BLOCK_REST)
    _rotate_heads(k_ptr + b * sk_b + s * sk_s, k_out + t64 * n_k_heads * head_dim, sk_h, head_dim, n_k_heads,
                  head_dim, half, cos, sin, BLOCK_HK, HALF, BLOCK_REST)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               num_warps: int | None = None):
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or positions.shape != q.shape[:2]:
        raise ValueError("apply_rope: q [B, S, Hq, D], k [B, S, Hkv, D] and positions [B, S] must agree")
    if q.shape[-1] != k.shape[-1] or 2 * cos.shape[-1] > q.shape[-1]:
        raise ValueError(f"apply_rope: rotary dim {2 * cos.shape[-1]} must fit head_dim q {q.shape[-1]} / k {k.shape[-1]}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    positions, cos, sin = positions.contiguous(), cos.contiguous(), sin.contiguous()
    batch, seq, hq, head_dim = q.shape
    hk, half = k.shape[2], cos.shape[-1]
    q_out = torch.empty(batch, seq, hq, head_dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(batch, seq, hk, head_dim, dtype=k.dtype, device=k.device)
    rest = head_dim - 2 * half
    _rope_kernel[(batch * seq,)](q, k, q_out, k_out, cos, sin, positions, seq,
                                 q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                                 hq, hk, head_dim, half, BLOCK_HQ=pow2(hq), BLOCK_HK=pow2(hk), HALF=pow2(half),
                                 BLOCK_REST=pow2(rest) if rest else 0, num_warps=num_warps or 4)
    return q_out, k_out


def rope_cos_sin_cache_ref(inv_freq: torch.Tensor, max_positions: int):
    """(cos, sin), each [max_positions, len(inv_freq)] float32, of position * inv_freq."""
    positions = torch.arange(max_positions, device=inv_freq.device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq.float()[None, :]
    return angles.cos(), angles.sin()


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor):
    """q: [B, S, Hq, D], k: [B, S, Hkv, D], positions: [B, S] int -> rotated (q, k), same shapes."""
    c = cos[positions.long()][:, :, None, :]
    s = sin[positions.long()][:, :, None, :]
    return rotate_pairs(q, c.to(q.dtype), s.to(q.dtype)), rotate_pairs(k, c.to(k.dtype), s.to(k.dtype))
