"""Triton, when it is installed. Without it (e.g. macOS) the kernel files still import (the jit
decorator below returns the function as it is), the kernels are never launched, and every op runs
its torch reference."""

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    import types

    HAS_TRITON = False
    triton = types.SimpleNamespace(jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f),
                                   cdiv=lambda a, b: -(-a // b),
                                   next_power_of_2=lambda n: 1 << max(0, (int(n) - 1).bit_length()))
    tl = types.SimpleNamespace(constexpr=object)


def pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum): Triton block sizes must be powers of two."""
    return max(minimum, triton.next_power_of_2(int(n)))


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision for tl.dot: float32 must stay float32 (the GPU default for it is TF32)."""
    return "ieee" if dtype == torch.float32 else "tf32"
