"""Rotary position embedding: frequencies, the cos/sin cache, and its application to q and k.

Convention: HF "rotate_half" (GPT-NeoX) layout; only the first `rotary_dim` features of each head
rotate (partial rotary), the rest pass through. The cache holds cos/sin of position * inv_freq in
float32, shape [max_positions, rotary_dim // 2].
"""

from __future__ import annotations

import math

import torch

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
