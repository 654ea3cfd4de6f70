"""The one place that decides which implementation of an op runs.

Rule (DESIGN.md): CUDA tensors run the Triton kernel; CPU tensors run the plain-torch reference,
unless Triton's interpreter is on (TRITON_INTERPRET=1), in which case the Triton kernel runs on CPU
tensors. An op whose Triton kernel is not written yet always runs its reference.

`use_reference()` forces the reference path (for A/B comparisons and torch.compile baselines).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import NamedTuple

import torch


class RunSettings(NamedTuple):
    """How ops run in this thread. The engine sets them around a step (engine/switches.py: its
    settings, read once); tests and benchmarks set them around a block (run_with)."""
    force_reference: bool = False           # every op runs its torch reference (use_reference)
    forbid_reference_on_cuda: bool = False  # a reference op on a CUDA tensor raises (forbid_reference_on_cuda)
    pdl: str = "on"                         # programmatic dependent launch: on, off, early, late (_triton.use_pdl)
    early_release: bool = False             # a one-row decode step: PDL kernels release the next one early
    gemv_prefetch: int | None = None        # bytes of each weight row a GEMV prefetches (None: by size, gemv.py)
    batch_invariant: bool = False           # each row computed in an order that no batch size changes (Switches)
    decode_step: bool = False               # (batch_invariant) a decode step's forward: its rows take the GEMV
    int4_codes: str = "f32"                 # how the int4 GEMV's tensor-core path makes codes floats (gemv.py)
    byte_codes: str = "bits"                # int8 / fp8 ones: "bits" (Triton ops) or "ptx" (gemv_weights.py)
    packed_operands: str = "rows"           # packed weights' tensor-core dots: x W^T, or W x^T "weights" (gemv.py)
    int4_tile: tuple | None = None          # (BLOCK_N, BLOCK_K, warps, stages) of int4's tensor-core path
    byte_tile: tuple | None = None          # the same for int8 and fp8
    gemv_split: str = "off"                 # "auto": packed tensor-core GEMVs split K to fill the SMs (split_k.py)
    packed_row_dots: bool = False           # one row of packed weights on the tensor cores, not the CUDA cores
    packed_prefill: str = "dequantize"      # "gemm": prefill reads int4 weights packed (kernels/matmul.py)


_state = threading.local()
_DEFAULT = RunSettings()


def run_settings() -> RunSettings:
    return getattr(_state, "settings", _DEFAULT)


@contextlib.contextmanager
def run_with(**changes):
    """Within this block, this thread's RunSettings with `changes`; restored after."""
    previous = run_settings()
    _state.settings = previous._replace(**changes)
    try:
        yield
    finally:
        _state.settings = previous


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_reference(enabled: bool = True):
    """Within this block every op runs its torch reference, whatever the device."""
    return run_with(force_reference=enabled)


def forbid_reference_on_cuda(enabled: bool = True):
    """Debug switch: within this block (or, in a runner's steps, with EDGELLM_FORBID_REF_ON_CUDA=1) a
    reference op called on a CUDA tensor raises, proving the GPU hot path is all Triton."""
    return run_with(forbid_reference_on_cuda=enabled)


class ReferenceOnCudaError(RuntimeError):
    """A torch reference op ran on CUDA tensors while that was forbidden."""


def _first_tensor(args, kwargs) -> torch.Tensor:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(getattr(value, "data", None), torch.Tensor):  # a packed weight (edgellm/quant)
            return value.data
    raise TypeError("a kernel op needs at least one tensor argument")


class KernelOp:
    """A callable op: `reference` always exists; `triton` (the launcher) once the kernel is written.
    decider: the positional argument whose device picks the path (default: the first tensor); the
    KV block copies name the cache, since their pool may be pinned host memory that the kernel reads."""

    def __init__(self, name: str, reference, triton=None, decider: int = 0):
        self.name = name
        self.reference = reference
        self.triton = triton
        self.decider = decider
        self.__doc__ = reference.__doc__

    def uses_triton(self, tensor: torch.Tensor) -> bool:
        if self.triton is None or run_settings().force_reference:
            return False
        # The interpreter computes with numpy, which has no bfloat16: such CPU tensors take the reference.
        return tensor.is_cuda or (interpreter_on() and tensor.dtype != torch.bfloat16)

    def __call__(self, *args, **kwargs):
        tensor = _first_tensor(args[self.decider:] or args, kwargs)
        if self.uses_triton(tensor):
            return self.triton(*args, **kwargs)
        settings = run_settings()
        if tensor.is_cuda and settings.forbid_reference_on_cuda and not settings.force_reference:
            raise ReferenceOnCudaError(f"reference op {self.name!r} ran on a CUDA tensor")
        return self.reference(*args, **kwargs)

    def __repr__(self) -> str:
        return f"KernelOp({self.name!r}, triton={'yes' if self.triton else 'not yet'})"
