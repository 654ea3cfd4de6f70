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

import torch

_state = threading.local()


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _forced_reference() -> bool:
    return getattr(_state, "force_reference", False)


@contextlib.contextmanager
def thread_flag(state: threading.local, name: str, enabled: bool):
    """Sets state.<name> for the calling thread within the block, restoring what it was after."""
    previous = getattr(state, name, False)
    setattr(state, name, enabled)
    try:
        yield
    finally:
        setattr(state, name, previous)


def use_reference(enabled: bool = True):
    """Within this block every op runs its torch reference, whatever the device."""
    return thread_flag(_state, "force_reference", enabled)


def _reference_forbidden() -> bool:
    return getattr(_state, "forbid_reference_on_cuda", False) or os.environ.get("EDGELLM_FORBID_REF_ON_CUDA") == "1"


def forbid_reference_on_cuda(enabled: bool = True):
    """Debug switch: within this block (or with EDGELLM_FORBID_REF_ON_CUDA=1) a reference op called
    on a CUDA tensor raises, proving the GPU hot path is all Triton."""
    return thread_flag(_state, "forbid_reference_on_cuda", enabled)


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
        if self.triton is None or _forced_reference():
            return False
        # The interpreter computes with numpy, which has no bfloat16: such CPU tensors take the reference.
        return tensor.is_cuda or (interpreter_on() and tensor.dtype != torch.bfloat16)

    def __call__(self, *args, **kwargs):
        tensor = _first_tensor(args[self.decider:] or args, kwargs)
        if self.uses_triton(tensor):
            return self.triton(*args, **kwargs)
        if tensor.is_cuda and _reference_forbidden() and not _forced_reference():
            raise ReferenceOnCudaError(f"reference op {self.name!r} ran on a CUDA tensor")
        return self.reference(*args, **kwargs)

    def __repr__(self) -> str:
        return f"KernelOp({self.name!r}, triton={'yes' if self.triton else 'not yet'})"
