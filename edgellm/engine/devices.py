"""Which device and dtype an engine runs on, from what the caller asked for."""

from __future__ import annotations

import torch

from ..errors import ConfigurationError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigurationError(f"bad device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("device 'cuda' was asked for but torch sees no CUDA GPU")
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigurationError(f"unsupported device {device!r}: use 'cpu' or 'cuda'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ConfigurationError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list, a host tensor or a device tensor) as a `dtype` tensor on `device`, without
    waiting for the device: a host value goes through pinned memory in a non-blocking copy (a copy from
    pageable memory would wait for every step queued before it, and with them the run-ahead)."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
