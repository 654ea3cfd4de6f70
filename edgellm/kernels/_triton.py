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


# Programmatic dependent launch (Hopper and later). A decode step is hundreds of short dependent
# kernels, each paying a launch and a drain. A kernel launched with launch_pdl=True may be scheduled
# as soon as every program of the kernel before it has called gdc_launch_dependents(), which ours do
# once their loads are done, just before their final stores; it then blocks in gdc_wait(), at its
# very start, until that kernel has finished and its writes are visible. So nothing is read or
# written early, and the next launch overlaps the previous kernel's tail (bench/chain.py measured a
# 30-layer GEMV chain 8% faster). Kernels launched without it (torch's, cuBLAS) wait as usual.
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAS_GDC = True
except ImportError:  # triton without grid dependency control: PDL stays off
    _HAS_GDC = False
    gdc_launch_dependents = gdc_wait = None

_pdl_devices: dict = {}


def use_pdl(tensor: torch.Tensor) -> bool:
    """Launch with PDL: a CUDA tensor on compute capability >= 9.0, a triton with the GDC
    instructions, not the interpreter, and EDGELLM_PDL not set to 0."""
    import os

    if not (tensor.is_cuda and _HAS_GDC) or os.environ.get("EDGELLM_PDL", "1") == "0" \
            or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    if index not in _pdl_devices:
        _pdl_devices[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _pdl_devices[index]


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """First statement of a PDL kernel: wait until the previous kernel has finished."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """After a PDL kernel's last loads: the next kernel may be scheduled (it waits in pdl_wait)."""
    if PDL:
        gdc_launch_dependents()
