"""VisionEncoder: a VLM's vision tower behind one interface, with a cache of its outputs.

`prepare(source)` loads and preprocesses an image on the host (no GPU work: bad images fail here);
`encode(images)` runs the encoder once over every image not in the cache, all packed into one
block-diagonal call, and returns one [tokens, hidden] embedding tensor per image. The cache is
keyed by the image's pixel digest (images.py) and bounded in bytes (least recently used out)."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np
import torch

from .config import VisionConfig
from .images import image_digest, load_image
from .qwen_preprocess import preprocess_qwen
from .qwen_vit import load_qwen_vit, qwen_layout, qwen_vit_forward

DEFAULT_CACHE_BYTES = 64 << 20


@dataclasses.dataclass
class PreparedImage:
    pixels: np.ndarray            # the family's pixel tensor (Qwen: [patches, C*T*P*P] float32)
    grid: tuple[int, int, int]    # Qwen: the patch grid (t, h, w)
    tokens: int                   # language-model tokens the image becomes
    digest: str                   # of the RGB pixels and the preprocessing: the cache and KV-reuse key


class VisionEncoder:
    def __init__(self, model_dir: str | Path, config: VisionConfig, *, device: torch.device, dtype: torch.dtype,
                 cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.config, self.device, self.dtype = config, device, dtype
        self.weights = load_qwen_vit(model_dir, config, device, dtype)
        self.cache_bytes = cache_bytes
        self._cache: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._cached_bytes = 0
        self.encoded_images = 0  # images the encoder ran on (cache misses), for tests and stats

    def prepare(self, source, where: str = "image") -> PreparedImage:
        image = load_image(source, where)
        pixels, grid = preprocess_qwen(image, self.config.preprocess)
        digest = f"{image_digest(image)}:{self.config.preprocess}"
        return PreparedImage(pixels, grid, grid[0] * grid[1] * grid[2] // self.config.merge_size ** 2, digest)

    def encode(self, images: list[PreparedImage]) -> list[torch.Tensor]:
        """One [tokens, out_hidden] tensor per image (engine dtype, on the device)."""
        missing = [im for im in dict((im.digest, im) for im in images).values() if im.digest not in self._cache]
        fresh = {}
        if missing:
            fresh = dict(zip((im.digest for im in missing), self.run(missing)))
            for digest, emb in fresh.items():
                self._remember(digest, emb)
        result = []
        for im in images:
            emb = fresh.get(im.digest)
            if emb is None:
                emb = self._cache[im.digest]
                self._cache.move_to_end(im.digest)
            result.append(emb)
        return result

    def run(self, images: list[PreparedImage]) -> list[torch.Tensor]:
        """The encoder over these images, packed into one call (no cache): one tensor per image."""
        pixels = torch.from_numpy(np.concatenate([im.pixels for im in images])).to(self.device, self.dtype)
        layout = qwen_layout(self.config, [im.grid for im in images], self.device)
        out = qwen_vit_forward(self.weights, self.config, pixels, layout)
        self.encoded_images += len(images)
        return list(out.split([im.tokens for im in images]))

    def _remember(self, digest: str, emb: torch.Tensor) -> None:
        size = emb.numel() * emb.element_size()
        if size > self.cache_bytes:
            return
        self._cache[digest] = emb
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()

