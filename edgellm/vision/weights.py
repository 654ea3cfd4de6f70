"""Reading a VLM checkpoint's vision tensors (the language model's are engine/weights.py's)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open

from ..engine.weights import checkpoint_files
from ..errors import ModelLoadError


def read_vision_tensors(model_dir: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Every tensor under one of `prefixes`, by its name after the prefix (CPU, stored dtype)."""
    found: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(Path(model_dir)):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    for prefix in prefixes:
                        if name.startswith(prefix):
                            found[name[len(prefix):]] = f.get_tensor(name)
        except Exception as exc:  # safetensors raises several types for truncated/corrupt files
            raise ModelLoadError(f"cannot read weights from {path}: {exc}") from exc
    if not found:
        raise ModelLoadError(f"{model_dir} has no vision tower weights (looked for {', '.join(prefixes)})")
    return found


class TensorTaker:
    """Takes named tensors out of a checkpoint dict, checking shapes, onto the device in one dtype."""

    def __init__(self, tensors: dict[str, torch.Tensor], device, dtype):
        self.tensors, self.device, self.dtype = tensors, device, dtype

    def __call__(self, name: str, shape: tuple[int, ...] | None = None, scale: str | None = None) -> torch.Tensor:
        """The tensor `name`; with `scale`, its rows multiplied by the vector of that name first, in
        float32 (folding a layer-scale into the weights before it is rounded to the engine dtype)."""
        if name not in self.tensors:
            raise ModelLoadError(f"vision checkpoint is missing tensor {name}")
        t = self.tensors[name]
        if shape is not None and t.numel() == math.prod(shape) and tuple(t.shape) != shape:
            t = t.reshape(shape)  # e.g. the patch embedding's Conv3d kernel, used as a matrix
        if shape is not None and tuple(t.shape) != shape:
            raise ModelLoadError(f"vision tensor {name} has shape {tuple(t.shape)}, the config needs {shape}")
        if scale is not None:
            factor = TensorTaker(self.tensors, self.device, torch.float32)(scale, (t.shape[0],))
            t = t.to(device=self.device, dtype=torch.float32) * factor.view(-1, *([1] * (t.dim() - 1)))
        return t.to(device=self.device, dtype=self.dtype).contiguous()

    def maybe(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
        return self(name, shape) if name in self.tensors else None

