"""VisionEncoder: a VLM's vision tower behind one interface, with a cache of its outputs.

`prepare(source)` loads and resizes an image on the host (no GPU work: bad images fail here);
`encode(images)` runs the encoder once over every image not in the cache, all packed into one
block-diagonal call (the uint8 pixels move to the device, where the family's tower, qwen_vit.py or
intern_vit.py, normalises and encodes them), and returns one [tokens, hidden] embedding tensor per image. The cache is
keyed by the image's pixel digest (images.py) and bounded in bytes (least recently used out)."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np
import torch

from .config import VisionConfig
from .graphs import EncoderGraphs
from .images import image_digest, load_image
from .intern_vit import InternTower
from .qwen_vit import QwenTower

DEFAULT_CACHE_BYTES = 64 << 20


@dataclasses.dataclass
class PreparedImage:
    pixels: np.ndarray            # uint8 RGB, resized: Qwen [H, W, 3], InternVL its tiles [T, S, S, 3]
    grid: tuple[int, ...]         # Qwen: the patch grid (t, h, w); InternVL: (tiles,)
    tokens: int                   # language-model tokens the image becomes
    digest: str                   # of the RGB pixels and the preprocessing: the cache and KV-reuse key


class VisionEncoder:
    def __init__(self, model_dir: str | Path, config: VisionConfig, *, device: torch.device, dtype: torch.dtype,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, cuda_graphs: bool = True):
        """cuda_graphs: replay the encoder from CUDA graphs for image shapes seen before (graphs.py)."""
        self.config, self.device, self.dtype = config, device, dtype
        self.tower = (InternTower if config.family == "internvl" else QwenTower)(model_dir, config, device, dtype)
        self.graphs = EncoderGraphs(self.tower, device, enabled=cuda_graphs)
        self.cache_bytes = cache_bytes
        self._cache: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._cached_bytes = 0
        self.encoded_images = 0  # images the encoder ran on (cache misses), for tests and stats

    def prepare(self, source, where: str = "image") -> PreparedImage:
        image = load_image(source, where)
        pixels, grid, tokens = self.tower.host_pixels(image)
        return PreparedImage(pixels, grid, tokens, f"{image_digest(image)}:{self.config.preprocess}")

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
        # Inference mode throughout: a graph's static inputs, made inside it, take new pixels in place.
        with torch.inference_mode():
            out = self.graphs.run(images)
            if out is None:
                out = self.tower.compute(self._device_pixels(images), self.tower.layout(images))
        self.encoded_images += len(images)
        return list(out.split([im.tokens for im in images]))

    def pixel_values(self, images: list[PreparedImage]) -> torch.Tensor:
        """float32 pixels on the device, as transformers' image processor gives them (tests, benchmarks)."""
        return self.tower.normalized(self._device_pixels(images), [im.grid for im in images])

    def _device_pixels(self, images: list[PreparedImage]) -> list[torch.Tensor]:
        return [t.to(self.device) for t in self.tower.host_tensors(images)]

    def _remember(self, digest: str, emb: torch.Tensor) -> None:
        size = emb.numel() * emb.element_size()
        if size > self.cache_bytes:
            return
        self._cache[digest] = emb
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()

