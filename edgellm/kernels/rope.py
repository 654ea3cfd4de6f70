"""Rotary position embedding: frequencies, the cos/sin cache, and its application to q and k.

Convention: HF "rotate_half" (GPT-NeoX) layout; only the first `rotary_dim` features of each head
rotate (partial rotary), the rest pass through. The cache holds cos/sin of position * inv_freq in
float32, shape [max_positions, rotary_dim // 2].
"""

from __future__ import annotations

import math

import torch

from ._triton import pow2, tl, triton

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


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
def _rope_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, pos_ptr, seq_len, stride_b, stride_s, stride_h,
                 n_heads, head_dim, half, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    b = token // seq_len
    s = token % seq_len
    pos = tl.load(pos_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (d < head_dim)
    base = x_ptr + b.to(tl.int64) * stride_b + s.to(tl.int64) * stride_s + heads * stride_h
    x = tl.load(base + d, mask=mask, other=0.0).to(tl.float32)
    rotary = d < 2 * half
    first = d < half
    # rotate_half: the partner of feature d is d + half (first half, negated) or d - half (second half).
    partner_d = tl.where(first, d + half, d - half)
    partner = tl.load(base + partner_d, mask=mask & rotary, other=0.0).to(tl.float32)
    partner = tl.where(first, -partner, partner)
    freq = tl.where(first, d, d - half)
    cos = tl.load(cos_ptr + pos * half + freq, mask=rotary, other=1.0)
    sin = tl.load(sin_ptr + pos * half + freq, mask=rotary, other=0.0)
    y = tl.where(rotary, x * cos + partner * sin, x)
    out = out_ptr + token.to(tl.int64) * n_heads * head_dim + heads * head_dim + d
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rope_one(x: torch.Tensor, cos, sin, positions) -> torch.Tensor:
    batch, seq, heads, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(batch, seq, heads, head_dim, dtype=x.dtype, device=x.device)
    _rope_kernel[(batch * seq,)](x, out, cos, sin, positions, seq, x.stride(0), x.stride(1), x.stride(2),
                                 heads, head_dim, cos.shape[-1], BLOCK_H=pow2(heads), BLOCK_D=pow2(head_dim))
    return out


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor):
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or positions.shape != q.shape[:2]:
        raise ValueError("apply_rope: q [B, S, Hq, D], k [B, S, Hkv, D] and positions [B, S] must agree")
    if 2 * cos.shape[-1] > q.shape[-1]:
        raise ValueError(f"apply_rope: rotary dim {2 * cos.shape[-1]} exceeds head_dim {q.shape[-1]}")
    positions = positions.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    return _rope_one(q, cos, sin, positions), _rope_one(k, cos, sin, positions)


def rope_cos_sin_cache_ref(inv_freq: torch.Tensor, max_positions: int):
    """(cos, sin), each [max_positions, len(inv_freq)] float32, of position * inv_freq."""
    positions = torch.arange(max_positions, device=inv_freq.device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq.float()[None, :]
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor):
    """q: [B, S, Hq, D], k: [B, S, Hkv, D], positions: [B, S] int -> rotated (q, k), same shapes."""
    c = cos[positions.long()][:, :, None, :]
    s = sin[positions.long()][:, :, None, :]
    return _rotate(q, c.to(q.dtype), s.to(q.dtype)), _rotate(k, c.to(k.dtype), s.to(k.dtype))
