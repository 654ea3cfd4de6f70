"""Qwen2-VL / Qwen2.5-VL image preprocessing with pillow and numpy: the image is resized so both
sides are multiples of patch_size * merge_size (28) with the pixel count inside [min_pixels,
max_pixels] ("smart resize", aspect ratio kept as closely as possible), rescaled and normalised,
then cut into patches of C x temporal_patch x P x P values (the resize on the host, the rest wherever
the uint8 pixels are: pixels.py). A still image fills the temporal patch
with two copies of itself. Patches are ordered block-major over merge_size x merge_size blocks: the
order the patch merger concatenates them in. Matches transformers' PIL image processor."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..errors import ImageError
from .pixels import normalize, resized_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT = 200


@dataclasses.dataclass(frozen=True)
class QwenImageSettings:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale: float = 1 / 255
    resample: int = 3  # PIL bicubic

    @classmethod
    def from_dict(cls, pre: dict, vision: dict | None = None) -> "QwenImageSettings":
        """From preprocessor_config.json (and the vision config for the patch geometry it lacks)."""
        vision = vision or {}
        size = pre.get("size") or {}
        pick = lambda key, fallback: pre.get(key, vision.get(key, fallback))  # noqa: E731
        return cls(
            patch_size=int(pick("patch_size", 14)),
            temporal_patch_size=int(pick("temporal_patch_size", 2)),
            merge_size=int(pre.get("merge_size", vision.get("spatial_merge_size", 2))),
            min_pixels=int(pre.get("min_pixels") or size.get("shortest_edge") or 56 * 56),
            max_pixels=int(pre.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280),
            mean=tuple(float(x) for x in pre.get("image_mean", CLIP_MEAN)),
            std=tuple(float(x) for x in pre.get("image_std", CLIP_STD)),
            rescale=float(pre.get("rescale_factor", 1 / 255)),
            resample=int(pre.get("resample", 3)),
        )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width), multiples of `factor`, pixel count within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ImageError(f"image of {width}x{height}: aspect ratio above {MAX_ASPECT} is not supported")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def qwen_image_tokens(image, settings: QwenImageSettings) -> tuple[int, int, int]:
    """The patch grid (t, h, w) an image becomes (without computing its pixels)."""
    h, w = smart_resize(image.height, image.width, settings.factor, settings.min_pixels, settings.max_pixels)
    return 1, h // settings.patch_size, w // settings.patch_size


def qwen_resized(image, settings: QwenImageSettings) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The host's part: the image resized to its patch grid, uint8 [H, W, 3], and the grid (1, gh, gw)."""
    _, gh, gw = qwen_image_tokens(image, settings)
    p = settings.patch_size
    return resized_rgb(image, gw * p, gh * p, settings.resample), (1, gh, gw)


def qwen_patches(rgb: torch.Tensor, grid: tuple[int, int, int], settings: QwenImageSettings,
                 stats=None) -> torch.Tensor:
    """The device's part: uint8 [H, W, 3] -> pixel_values float32 [gh * gw, 3 * T * P * P]."""
    _, gh, gw = grid
    p, m, t = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    pixels = normalize(rgb, settings, stats)
    c = pixels.shape[0]
    patches = pixels.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    patches = patches[:, :, :, :, :, None].expand(*patches.shape[:5], t, p, p)
    return patches.reshape(gh * gw, c * t * p * p)


def preprocess_qwen(image, settings: QwenImageSettings) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An RGB PIL image -> (pixel_values float32 [gh * gw, 3 * T * P * P], grid (1, gh, gw)), on the host."""
    rgb, grid = qwen_resized(image, settings)
    return qwen_patches(torch.from_numpy(rgb), grid, settings).numpy(), grid
