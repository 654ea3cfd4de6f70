"""The InternVL vision side: InternViT, the pixel shuffle and the MLP projector.

Tiles ([T, 3, S, S], preprocessing: internvl_preprocess.py) -> patch embedding (one matmul: the
Conv2d with stride = kernel) -> a CLS token in front and the absolute position table added -> `depth`
pre-norm blocks (vit_blocks.py; attention within each tile: one segment of S/P * S/P + 1 tokens) ->
the CLS token dropped -> pixel shuffle (merge x merge neighbouring patches concatenated into one
token, HF's channel order) -> LayerNorm, Linear, GELU, Linear into the language model's width.

The layer-scale vectors (lambda_1 / lambda_2, applied to the attention and MLP outputs) are folded
into the rows of the output projection and fc2 at load, in float32: no extra elementwise pass.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ..kernels import ops
from ..kernels.segment_attention import segment_bounds
from .config import VisionConfig
from .internvl_preprocess import internvl_rgb_tiles
from .pixels import channel_stats, normalize
from .vit_blocks import Block, run_blocks
from .weights import TensorTaker, read_vision_tensors

PROJECTOR_EPS = 1e-5  # the projector's nn.LayerNorm keeps torch's default


@dataclasses.dataclass
class InternVitWeights:
    patch: torch.Tensor          # [width, C*P*P]
    patch_bias: torch.Tensor
    cls: torch.Tensor            # [width]
    positions: torch.Tensor      # [1 + patches, width]
    blocks: list[Block]
    final_norm: torch.Tensor | None
    final_norm_bias: torch.Tensor | None
    proj_norm: torch.Tensor
    proj_norm_bias: torch.Tensor
    proj_fc1: torch.Tensor
    proj_fc1_bias: torch.Tensor
    proj_fc2: torch.Tensor
    proj_fc2_bias: torch.Tensor


def load_intern_vit(model_dir, cfg: VisionConfig, device, dtype) -> InternVitWeights:
    # transformers 5.x keeps the towers under `model.`, 4.x at the top level.
    take = TensorTaker(read_vision_tensors(model_dir, ("model.vision_tower.", "vision_tower.")), device, dtype)
    head = TensorTaker(read_vision_tensors(model_dir, ("model.multi_modal_projector.", "multi_modal_projector.")),
                       device, dtype)
    w, i, layer_norm = cfg.width, cfg.intermediate, cfg.norm == "layer_norm"
    blocks = []
    for n in range(cfg.depth):
        p = f"encoder.layer.{n}."
        a = p + "attention."
        qkv_bias = [take.maybe(f"{a}{x}_proj.bias", (w,)) for x in "qkv"]
        blocks.append(Block(
            norm1=take(p + "layernorm_before.weight", (w,)),
            norm1_bias=take(p + "layernorm_before.bias", (w,)) if layer_norm else None,
            qkv=torch.cat([take(f"{a}{x}_proj.weight", (w, w)) for x in "qkv"]),
            qkv_bias=torch.cat(qkv_bias) if all(b is not None for b in qkv_bias) else None,
            proj=take(a + "projection_layer.weight", (w, w), scale=p + "lambda_1"),
            proj_bias=take(a + "projection_layer.bias", (w,), scale=p + "lambda_1"),
            norm2=take(p + "layernorm_after.weight", (w,)),
            norm2_bias=take(p + "layernorm_after.bias", (w,)) if layer_norm else None,
            fc1=take(p + "mlp.fc1.weight", (i, w)), fc1_bias=take(p + "mlp.fc1.bias", (i,)),
            fc2=take(p + "mlp.fc2.weight", (w, i), scale=p + "lambda_2"),
            fc2_bias=take(p + "mlp.fc2.bias", (w,), scale=p + "lambda_2"),
            q_norm=take(a + "q_norm.weight", (w,)) if cfg.qk_norm else None,
            k_norm=take(a + "k_norm.weight", (w,)) if cfg.qk_norm else None))
    grid = cfg.image_size // cfg.patch_size
    merged = w * cfg.merge_size ** 2
    return InternVitWeights(
        patch=take("embeddings.patch_embeddings.projection.weight", (w, cfg.patch_values)),
        patch_bias=take("embeddings.patch_embeddings.projection.bias", (w,)),
        cls=take("embeddings.cls_token", (w,)), positions=take("embeddings.position_embeddings", (grid * grid + 1, w)),
        blocks=blocks,
        final_norm=take("layernorm.weight", (w,)) if cfg.final_norm else None,
        final_norm_bias=take("layernorm.bias", (w,)) if cfg.final_norm else None,
        proj_norm=head("layer_norm.weight", (merged,)), proj_norm_bias=head("layer_norm.bias", (merged,)),
        proj_fc1=head("linear_1.weight", (cfg.out_hidden, merged)), proj_fc1_bias=head("linear_1.bias", (cfg.out_hidden,)),
        proj_fc2=head("linear_2.weight", (cfg.out_hidden, cfg.out_hidden)),
        proj_fc2_bias=head("linear_2.bias", (cfg.out_hidden,)))


def intern_vit_forward(w: InternVitWeights, cfg: VisionConfig, pixels: torch.Tensor,
                       bounds: tuple[torch.Tensor, int]) -> torch.Tensor:
    """pixels [T, C, S, S] (all tiles of a call) -> [T * tile_tokens, out_hidden]; bounds: each
    tile's attention segment (segment_bounds)."""
    tiles, channels, size, p, m = pixels.shape[0], cfg.in_channels, cfg.image_size, cfg.patch_size, cfg.merge_size
    grid, width = size // p, cfg.width
    tokens = grid * grid + 1
    patches = pixels.view(tiles, channels, grid, p, grid, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, cfg.patch_values)
    x = F.linear(patches, w.patch, w.patch_bias).view(tiles, grid * grid, width)
    x = (torch.cat([w.cls.expand(tiles, 1, width), x], dim=1) + w.positions).view(tiles * tokens, width)

    def qk_norm(block, q, k):
        if block.q_norm is None:
            return q, k
        n = q.shape[0]
        return (ops.rms_norm(q.reshape(n, width), block.q_norm, 1e-6).view(q.shape),
                ops.rms_norm(k.reshape(n, width), block.k_norm, 1e-6).view(k.shape))

    layers = cfg.depth if cfg.feature_layer == -1 else cfg.feature_layer % (cfg.depth + 1)
    x, residual = run_blocks(cfg, w.blocks[:layers], x, qk_norm, lambda index: bounds)
    if cfg.feature_layer == -1 and w.final_norm is not None:
        x = ops.add_layer_norm(x, residual, w.final_norm, w.final_norm_bias, cfg.norm_eps)[0]
    elif residual is not None:
        x = x + residual
    # Drop CLS; pixel shuffle: token (i, j) of the merged grid holds patches (m*i + r, m*j + s),
    # channels ordered (r, s, c): what transformers' pixel_shuffle produces.
    x = x.view(tiles, tokens, width)[:, 1:].reshape(tiles, grid // m, m, grid // m, m, width)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, m * m * width)
    h = F.linear(ops.layer_norm(x, w.proj_norm, w.proj_norm_bias, PROJECTOR_EPS), w.proj_fc1, w.proj_fc1_bias)
    return F.linear(ops.activation(h, cfg.projector_act), w.proj_fc2, w.proj_fc2_bias)


class InternTower:
    """InternVL behind the encoder's interface (encoder.py). Host pixels: an image's uint8 tiles
    [T, S, S, 3], all images' in one tensor; the layout: each tile's attention segment."""

    def __init__(self, model_dir, cfg: VisionConfig, device, dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.weights = load_intern_vit(model_dir, cfg, device, dtype)
        self.stats = channel_stats(cfg.preprocess, device)
        self.tile_patches = (cfg.image_size // cfg.patch_size) ** 2 + 1  # with the CLS token

    def host_pixels(self, image) -> tuple[np.ndarray, tuple[int, ...], int]:
        tiles = internvl_rgb_tiles(image, self.cfg.preprocess)
        return tiles, (tiles.shape[0],), tiles.shape[0] * self.cfg.tile_tokens

    def host_tensors(self, images) -> list[torch.Tensor]:
        return [torch.from_numpy(np.concatenate([im.pixels for im in images]))]

    def layout(self, images) -> tuple[torch.Tensor, int]:
        tiles, n = sum(im.grid[0] for im in images), self.tile_patches
        return segment_bounds(list(range(0, tiles * n + 1, n)), self.device)

    def graph_key(self, images) -> tuple:
        return (sum(im.grid[0] for im in images),)

    def patches(self, images) -> int:
        return sum(im.grid[0] for im in images) * self.tile_patches

    def normalized(self, pixels: list[torch.Tensor], grids=None) -> torch.Tensor:
        """float32 [tiles, 3, S, S]: transformers' pixel_values, from the device's uint8 tiles."""
        return normalize(pixels[0], self.cfg.preprocess, self.stats)

    def compute(self, pixels: list[torch.Tensor], layout: tuple[torch.Tensor, int]) -> torch.Tensor:
        """Device work only (no host copies, no syncs): what a CUDA graph captures."""
        return intern_vit_forward(self.weights, self.cfg, self.normalized(pixels).to(self.dtype), layout)
