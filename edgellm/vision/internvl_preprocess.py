"""InternVL image preprocessing with pillow and numpy ("dynamic tiling"): the image is resized to a
grid of columns x rows square tiles of tile_size pixels, the grid (with min_tiles <= tiles <=
max_tiles) whose aspect ratio is closest to the image's (ties go to more tiles while the image's area
exceeds half the grid's), cut into those tiles row by row, plus a thumbnail of the whole image when
there is more than one tile; each tile rescaled and normalised (ImageNet statistics) wherever its
uint8 pixels are (pixels.py). Matches
transformers' PIL image processor (GotOcr2ImageProcessorPil with crop_to_patches)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .pixels import normalize, resized_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class InternVLImageSettings:
    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    thumbnail: bool = True
    tiling: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    rescale: float = 1 / 255
    resample: int = 3  # PIL bicubic

    @classmethod
    def from_dict(cls, pre: dict) -> "InternVLImageSettings":
        size = pre.get("size") or {}
        # Tiling stays on whatever the file's crop_to_patches says: transformers' InternVLProcessor passes
        # crop_to_patches=True to its image processor by default, so that is what InternVL models see.
        return cls(tile_size=int(size.get("height", 448)), min_tiles=int(pre.get("min_patches", 1)),
                   max_tiles=int(pre.get("max_patches", 12)), tiling=True,
                   mean=tuple(float(x) for x in pre.get("image_mean", IMAGENET_MEAN)),
                   std=tuple(float(x) for x in pre.get("image_std", IMAGENET_STD)),
                   rescale=float(pre.get("rescale_factor", 1 / 255)), resample=int(pre.get("resample", 3)))


def tile_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of the tiling for an image of width x height."""
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if min_tiles <= c * r <= max_tiles), key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for columns, rows in grids:
        diff = abs(aspect - columns / rows)
        if diff < best_diff:
            best, best_diff = (columns, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * columns * rows:
            best = (columns, rows)
    return best


def internvl_tiles(image, settings: InternVLImageSettings) -> int:
    """How many tiles (thumbnail included) an image becomes."""
    if not settings.tiling or settings.max_tiles <= 1:
        return 1
    columns, rows = tile_grid(image.width, image.height, settings.tile_size, settings.min_tiles, settings.max_tiles)
    return columns * rows + (1 if settings.thumbnail and columns * rows != 1 else 0)


def internvl_rgb_tiles(image, settings: InternVLImageSettings) -> np.ndarray:
    """The host's part: the image's tiles (thumbnail last), uint8 [tiles, tile_size, tile_size, 3]."""
    t = settings.tile_size
    if not settings.tiling or settings.max_tiles <= 1:
        return resized_rgb(image, t, t, settings.resample)[None]
    columns, rows = tile_grid(image.width, image.height, t, settings.min_tiles, settings.max_tiles)
    whole = resized_rgb(image, columns * t, rows * t, settings.resample)
    tiles = [whole[r * t:(r + 1) * t, c * t:(c + 1) * t] for r in range(rows) for c in range(columns)]
    if settings.thumbnail and len(tiles) != 1:
        tiles.append(resized_rgb(image, t, t, settings.resample))
    return np.stack(tiles)


def preprocess_internvl(image, settings: InternVLImageSettings) -> np.ndarray:
    """An RGB PIL image -> pixel_values float32 [tiles, 3, tile_size, tile_size], on the host."""
    return normalize(torch.from_numpy(internvl_rgb_tiles(image, settings)), settings).numpy()
