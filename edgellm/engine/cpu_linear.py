"""The engine's matmuls on the CPU (where no Triton kernel runs them): torch's linear, over a packed
weight dequantized once and kept.

Why: a CPU has no kernel that reads packed weights, and dequantizing each one at every step made int8
decode 4x slower than float32 (bench/RESULTS.md); a packed weight on the CPU is therefore dequantized
on first use and kept beside its packed form (the memory of the compute dtype, the speed of float32).
numpy's BLAS (OpenBLAS) runs a lone float32 GEMV faster than torch's linear (MKL) on a 2-core AVX2
EPYC (34.6 against 63.1 ms for a decode step's matrices of the SmolLM2-135M shape), but between
torch's ops its thread pool and torch's contend for the cores: 2.3 tok/s against 11.6 (bench/RESULTS.md)."""

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
