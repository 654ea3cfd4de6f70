"""The Qwen2-VL and Qwen2.5-VL vision encoders.

Patches (preprocess: [N, C*T*P*P]) -> patch embedding (one matmul: the Conv3d with stride = kernel)
-> `depth` pre-norm blocks -> the 2x2 patch merger -> one embedding per merged patch, in the
language model's width. Qwen2-VL blocks: LayerNorm, full attention over each image, fc1 / QuickGELU /
fc2. Qwen2.5-VL blocks: RMSNorm, SwiGLU, and attention within windows of window_size pixels except
in the blocks its config names, where it spans each image; tokens are reordered window by window
once, so every window is one contiguous segment, and the merger's output is put back in order.

The blocks are vit_blocks.py's. Attention over all images of a call at once is block-diagonal:
kernels/segment_attention.py with per-token segment bounds. Rotary: 2-D, the first quarter of the head's frequencies turn with the
patch row, the second with the column (a per-token cos/sin table, kernels/rope.py's rotation).
Norms, activations, SwiGLU and rotary are Triton kernels; matmuls are cuBLAS.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ..kernels import ops
from ..kernels.segment_attention import segment_bounds
from .config import VisionConfig
from .pixels import channel_stats
from .qwen_preprocess import qwen_patches, qwen_resized
from .vit_blocks import Block, norm, run_blocks
from .weights import TensorTaker, read_vision_tensors


@dataclasses.dataclass
class QwenVitWeights:
    patch: torch.Tensor        # [width, C*T*P*P]
    blocks: list[Block]
    merge_norm: torch.Tensor
    merge_norm_bias: torch.Tensor | None
    merge_fc1: torch.Tensor
    merge_fc1_bias: torch.Tensor
    merge_fc2: torch.Tensor
    merge_fc2_bias: torch.Tensor


def load_qwen_vit(model_dir, cfg: VisionConfig, device, dtype) -> QwenVitWeights:
    # transformers 4.x checkpoints keep the vision tower at the top level, 5.x under `model.`.
    take = TensorTaker(read_vision_tensors(model_dir, ("visual.", "model.visual.")), device, dtype)
    w, i, layer_norm = cfg.width, cfg.intermediate, cfg.norm == "layer_norm"
    blocks = []
    for n in range(cfg.depth):
        p = f"blocks.{n}."
        if cfg.activation == "silu":
            fc1 = torch.cat([take(p + "mlp.gate_proj.weight", (i, w)), take(p + "mlp.up_proj.weight", (i, w))])
            fc1_bias = torch.cat([take(p + "mlp.gate_proj.bias", (i,)), take(p + "mlp.up_proj.bias", (i,))])
            fc2, fc2_bias = take(p + "mlp.down_proj.weight", (w, i)), take(p + "mlp.down_proj.bias", (w,))
        else:
            fc1, fc1_bias = take(p + "mlp.fc1.weight", (i, w)), take(p + "mlp.fc1.bias", (i,))
            fc2, fc2_bias = take(p + "mlp.fc2.weight", (w, i)), take(p + "mlp.fc2.bias", (w,))
        blocks.append(Block(
            norm1=take(p + "norm1.weight", (w,)), norm1_bias=take(p + "norm1.bias", (w,)) if layer_norm else None,
            qkv=take(p + "attn.qkv.weight", (3 * w, w)), qkv_bias=take(p + "attn.qkv.bias", (3 * w,)),
            proj=take(p + "attn.proj.weight", (w, w)), proj_bias=take(p + "attn.proj.bias", (w,)),
            norm2=take(p + "norm2.weight", (w,)), norm2_bias=take(p + "norm2.bias", (w,)) if layer_norm else None,
            fc1=fc1.contiguous(), fc1_bias=fc1_bias.contiguous(), fc2=fc2, fc2_bias=fc2_bias))
    merged = w * cfg.merge_size ** 2
    return QwenVitWeights(
        patch=take("patch_embed.proj.weight", (w, cfg.patch_values)), blocks=blocks,
        merge_norm=take("merger.ln_q.weight", (w,)),
        merge_norm_bias=take("merger.ln_q.bias", (w,)) if layer_norm else None,
        merge_fc1=take("merger.mlp.0.weight", (merged, merged)), merge_fc1_bias=take("merger.mlp.0.bias", (merged,)),
        merge_fc2=take("merger.mlp.2.weight", (cfg.out_hidden, merged)),
        merge_fc2_bias=take("merger.mlp.2.bias", (cfg.out_hidden,)))


@dataclasses.dataclass
class QwenLayout:
    """Where each patch of a call's images goes: computed on the host from the grids, moved once."""
    cos: torch.Tensor                  # [N, head_dim / 2] float32, in processing order
    sin: torch.Tensor
    positions: torch.Tensor            # [1, N]: row i of the tables
    full: tuple[torch.Tensor, int]     # segment bounds [2, N] and the longest segment: one per image
    window: tuple[torch.Tensor, int] | None  # the same per window (Qwen2.5-VL)
    order: torch.Tensor | None         # merged-patch processing order (windows), and its inverse
    inverse: torch.Tensor | None
    grids: tuple[tuple[int, int, int], ...]  # the images' patch grids


def qwen_layout(cfg: VisionConfig, grids: list[tuple[int, int, int]], device) -> QwenLayout:
    m = cfg.merge_size
    rows, cols, cu, order, cu_win = [], [], [0], [], [0]
    merged_seen = 0
    unit = m * m
    for t, h, w in grids:
        # Patch (row, col) in the preprocessor's block-major order.
        r = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m).permute(0, 2, 1, 3).reshape(-1)
        c = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m).permute(0, 2, 1, 3).reshape(-1)
        rows.append(r.repeat(t))
        cols.append(c.repeat(t))
        for _ in range(t):
            cu.append(cu[-1] + h * w)
        if cfg.window_size:
            win = cfg.window_size // m // cfg.patch_size  # merged patches per window side
            gh, gw = h // m, w // m
            index = torch.arange(t * gh * gw).view(t, gh, gw)
            for f in range(t):
                for y in range(0, gh, win):
                    for x in range(0, gw, win):
                        cell = index[f, y:y + win, x:x + win].reshape(-1)
                        order.append(cell + merged_seen)
                        cu_win.append(cu_win[-1] + cell.numel() * unit)
            merged_seen += t * gh * gw
    rows, cols = torch.cat(rows), torch.cat(cols)
    quarter = cfg.head_dim // 4
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float32) / (2 * quarter))
    angles = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)
    window = order_t = inverse = None
    if cfg.window_size:
        order_t = torch.cat(order)
        inverse = torch.argsort(order_t)
        patch_order = (order_t[:, None] * unit + torch.arange(unit)).reshape(-1)
        angles = angles[patch_order]
        window = segment_bounds(cu_win, device)
        order_t, inverse = order_t.to(device), inverse.to(device)
    n = angles.shape[0]
    return QwenLayout(cos=angles.cos().to(device), sin=angles.sin().to(device),
                      positions=torch.arange(n, device=device)[None], full=segment_bounds(cu, device),
                      window=window, order=order_t, inverse=inverse, grids=tuple(grids))


def qwen_vit_forward(w: QwenVitWeights, cfg: VisionConfig, pixels: torch.Tensor, layout: QwenLayout) -> torch.Tensor:
    """pixels [N, C*T*P*P] (the images' patches, concatenated) -> [N / merge^2, out_hidden]."""
    n, width, unit = pixels.shape[0], cfg.width, cfg.merge_size ** 2
    x = F.linear(pixels, w.patch)
    if layout.order is not None:
        x = x.view(n // unit, unit, width)[layout.order].reshape(n, width)

    def rotate(block, q, k):
        q, k = ops.apply_rope(q[None], k[None], layout.cos, layout.sin, layout.positions)
        return q[0], k[0]

    def bounds_of(index):
        return layout.full if layout.window is None or index in cfg.full_attention_blocks else layout.window

    x, residual = run_blocks(cfg, w.blocks, x, rotate, bounds_of)
    h, _ = norm(cfg, x, residual, w.merge_norm, w.merge_norm_bias)
    h = F.linear(h.view(n // unit, unit * width), w.merge_fc1, w.merge_fc1_bias)
    out = F.linear(ops.activation(h, "gelu"), w.merge_fc2, w.merge_fc2_bias)
    return out if layout.inverse is None else out[layout.inverse]


class QwenTower:
    """Qwen2-VL / Qwen2.5-VL behind the encoder's interface (encoder.py). Host pixels: the image
    resized to its patch grid, uint8 [H, W, 3], one tensor per image; the layout: QwenLayout."""

    def __init__(self, model_dir, cfg: VisionConfig, device, dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.weights = load_qwen_vit(model_dir, cfg, device, dtype)
        self.stats = channel_stats(cfg.preprocess, device)

    def host_pixels(self, image) -> tuple[np.ndarray, tuple[int, ...], int]:
        rgb, grid = qwen_resized(image, self.cfg.preprocess)
        return rgb, grid, grid[0] * grid[1] * grid[2] // self.cfg.merge_size ** 2

    def host_tensors(self, images) -> list[torch.Tensor]:
        return [torch.from_numpy(im.pixels) for im in images]

    def layout(self, images) -> QwenLayout:
        return qwen_layout(self.cfg, [im.grid for im in images], self.device)

    def graph_key(self, images) -> tuple:
        return tuple(im.grid for im in images)

    def patches(self, images) -> int:
        return sum(t * h * w for t, h, w in (im.grid for im in images))

    def normalized(self, pixels: list[torch.Tensor], grids) -> torch.Tensor:
        """float32 [patches, C*T*P*P]: transformers' pixel_values, from the device's uint8 pixels."""
        return torch.cat([qwen_patches(p, g, self.cfg.preprocess, self.stats) for p, g in zip(pixels, grids)])

    def compute(self, pixels: list[torch.Tensor], layout: QwenLayout) -> torch.Tensor:
        """Device work only (no host copies, no syncs): what a CUDA graph captures."""
        return qwen_vit_forward(self.weights, self.cfg, self.normalized(pixels, layout.grids).to(self.dtype), layout)
