"""The transformer blocks every supported vision tower shares: pre-norm, fused q/k/v projection,
non-causal attention within segments (one image, tile or window each), output projection, then an
fc1 / activation / fc2 MLP (or SwiGLU), each half added to the residual stream. The residual add is
fused into the next norm (ops.add_layer_norm / add_rms_norm). What differs per family, how q and k
are prepared (2-D rotary for Qwen, an optional RMSNorm for InternVL) and which segments a block
attends over, comes in as `prepare_qk` and `bounds_of`."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from ..kernels import ops
from .config import VisionConfig


@dataclasses.dataclass
class Block:
    norm1: torch.Tensor
    norm1_bias: torch.Tensor | None
    qkv: torch.Tensor            # [3 * width, width]: q, k and v stacked
    qkv_bias: torch.Tensor | None
    proj: torch.Tensor
    proj_bias: torch.Tensor
    norm2: torch.Tensor
    norm2_bias: torch.Tensor | None
    fc1: torch.Tensor            # fc1, or gate and up stacked (SwiGLU)
    fc1_bias: torch.Tensor
    fc2: torch.Tensor
    fc2_bias: torch.Tensor
    q_norm: torch.Tensor | None = None  # InternVL's optional RMSNorm of q and k over the whole width
    k_norm: torch.Tensor | None = None


def norm(cfg: VisionConfig, x, residual, weight, bias, eps: float | None = None):
    """(norm(x + residual), x + residual); residual None: (norm(x), x)."""
    eps = cfg.norm_eps if eps is None else eps
    if cfg.norm == "layer_norm":
        if residual is None:
            return ops.layer_norm(x, weight, bias, eps), x
        return ops.add_layer_norm(x, residual, weight, bias, eps)
    if residual is None:
        return ops.rms_norm(x, weight, eps), x
    return ops.add_rms_norm(x, residual, weight, eps)


def run_blocks(cfg: VisionConfig, blocks: list[Block], x: torch.Tensor,
               prepare_qk: Callable[[Block, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
               bounds_of: Callable[[int], tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [N, width] through `blocks`; returns (the last block's output, the residual it adds to):
    the caller's final norm fuses the add."""
    n, width, heads, scale = x.shape[0], cfg.width, cfg.heads, cfg.head_dim ** -0.5
    residual = None
    for index, b in enumerate(blocks):
        h, residual = norm(cfg, x, residual, b.norm1, b.norm1_bias)
        qkv = F.linear(h, b.qkv, b.qkv_bias).view(n, 3, heads, cfg.head_dim)
        q, k = prepare_qk(b, qkv[:, 0], qkv[:, 1])
        bounds, longest = bounds_of(index)
        attn = ops.segment_attention(q, k, qkv[:, 2], bounds, scale, longest)
        x = F.linear(attn.reshape(n, width), b.proj, b.proj_bias)
        h, residual = norm(cfg, x, residual, b.norm2, b.norm2_bias)
        up = F.linear(h, b.fc1, b.fc1_bias)
        x = F.linear(ops.glu(up) if cfg.activation == "silu" else ops.activation(up, cfg.activation),
                     b.fc2, b.fc2_bias)
    return x, residual
