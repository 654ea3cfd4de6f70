"""The engine's matmuls on the CPU (where no Triton kernel runs them): torch's linear, over a packed
weight dequantized once and kept.

Why: a CPU has no kernel that reads packed weights, and dequantizing each one at every step made int8
decode 4x slower than float32 (bench/RESULTS.md); a packed weight on the CPU is therefore dequantized
on first use and kept beside its packed form (the memory of the compute dtype, the speed of float32).
Not numpy's BLAS, though alone it runs the GEMVs faster: between torch's ops the two thread pools
contend for the cores (bench/RESULTS.md, 2026-12-07)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.formats import QuantizedWeight


def dense_weight(weight, dtype: torch.dtype, dequantize) -> torch.Tensor:
    """`weight` as a plain tensor of `dtype`: a packed one dequantized (by `dequantize`) once per dtype."""
    if not isinstance(weight, QuantizedWeight):
        return weight
    kept = weight.__dict__.setdefault("_dense_on_cpu", {})
    if dtype not in kept:
        kept[dtype] = dequantize(weight, dtype)
    return kept[dtype]


def cpu_linear(x: torch.Tensor, weight, bias: torch.Tensor | None, dequantize) -> torch.Tensor:
    """x @ weight^T (+ bias) for CPU tensors, in x's dtype."""
    return F.linear(x, dense_weight(weight, x.dtype, dequantize), bias)
