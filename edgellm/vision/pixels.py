"""Pixels between the host and the device: images are resized on the host (pillow) and travel as
uint8 RGB, a quarter of the bytes of float32; rescaling, normalisation and patch layout happen on the
device, where they cost microseconds instead of tens of milliseconds of numpy on the host.

The arithmetic is transformers' PIL image processors' (rescale in float64, normalise in float32), so
the float pixels equal theirs to float32 rounding on any device."""

from __future__ import annotations

import numpy as np
import torch


def resized_rgb(image, width: int, height: int, resample: int) -> np.ndarray:
    """An RGB PIL image resized to width x height: uint8 [height, width, 3]."""
    resized = image if image.size == (width, height) else image.resize((width, height), resample=resample)
    return np.array(resized, dtype=np.uint8)  # a writable copy: torch.from_numpy takes it as is


def normalize(rgb: torch.Tensor, settings) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W], rescaled and normalised with the settings'
    rescale, mean and std."""
    pixels = (rgb.movedim(-1, -3).double() * settings.rescale).float()
    mean = torch.tensor(settings.mean, dtype=torch.float32, device=rgb.device)[:, None, None]
    std = torch.tensor(settings.std, dtype=torch.float32, device=rgb.device)[:, None, None]
    return (pixels - mean) / std
