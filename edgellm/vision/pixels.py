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


def channel_stats(settings, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The settings' mean and std as float32 [3, 1, 1] tensors on the device (a tower makes them once:
    a CUDA graph cannot copy them in from the host)."""
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float32, device=device)[:, None, None]  # noqa: E731
    return as_tensor(settings.mean), as_tensor(settings.std)


def normalize(rgb: torch.Tensor, settings, stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W], rescaled and normalised with the settings'
    rescale, mean and std (`stats`: channel_stats made beforehand)."""
    mean, std = stats if stats is not None else channel_stats(settings, rgb.device)
    pixels = (rgb.movedim(-1, -3).double() * settings.rescale).float()
    return (pixels - mean) / std
