"""Triton, when it is installed. Without it (e.g. macOS) the kernel files still import (the jit
decorator below returns the function as it is), the kernels are never launched, and every op runs
its torch reference."""

import torch

from .dispatch import interpreter_on, run_settings, run_with

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
# once their loads are done, just before their final stores (or, in early_release mode, right after
# their own wait); it then blocks in gdc_wait(), before any load that depends on the kernel before,
# until that kernel has finished and its writes are visible. So nothing is read or
# written early, and the next launch overlaps the previous kernel's tail (bench/chain.py measured a
# 30-layer GEMV chain 8% faster on the H100). Kernels launched without it (torch's, cuBLAS) wait as usual.
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _HAS_GDC = True
except ImportError:  # triton without grid dependency control: PDL stays off
    _HAS_GDC = False
    gdc_launch_dependents = gdc_wait = None

_pdl_devices: dict = {}


def early_release(enabled: bool = True):
    """Within this block, kernels launched with PDL release the next kernel right after their wait
    instead of after their loads (use_pdl mode 2). The decode step of one row asks for it: there its
    short kernels' launches then hide behind the kernel before (H100: SmolLM2-135M shape 1640 -> 1822
    tok/s); with 16 rows the early-placed waiting programs cost the running GEMV more than they save
    (Llama-3.2-1B shape 9750 -> 8616)."""
    return run_with(early_release=enabled)


def use_pdl(tensor: torch.Tensor) -> int:
    """How to launch with PDL: 0 not at all (a CPU tensor, compute capability < 9.0, a triton without
    the GDC instructions, the interpreter, or RunSettings.pdl "off"); 1 the next kernel may be scheduled
    once this one's loads are done (pdl_release); 2 once its wait is over (pdl_wait), so the next
    kernel's launch and its weight prefetch (gemv.py) overlap this kernel's whole body: inside
    early_release(), or always with pdl "early" ("late": never)."""
    settings = run_settings()
    if not (tensor.is_cuda and _HAS_GDC) or settings.pdl == "off" or interpreter_on():
        return 0
    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    if index not in _pdl_devices:
        _pdl_devices[index] = torch.cuda.get_device_capability(index)[0] >= 9
    if not _pdl_devices[index]:
        return 0
    early = settings.pdl == "early" or (settings.pdl != "late" and settings.early_release)
    return 2 if early else 1


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """First statement of a PDL kernel (after loads that do not depend on the kernel before, such as
    weight prefetches): wait until the previous kernel has finished."""
    if PDL:
        gdc_wait()
    if PDL == 2:
        gdc_launch_dependents()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """After a PDL kernel's last loads: the next kernel may be scheduled (it waits in pdl_wait)."""
    if PDL == 1:
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, mask):
    """Asks L2 to fetch the lines at ptrs (where mask) without waiting for them: a kernel's weights,
    before it waits for the kernel before (its weights do not depend on it). Compiled GPU only."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                              "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
