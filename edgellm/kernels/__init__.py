"""Hot-path ops. Each file holds one op: Triton kernel(s), a launcher, and a `_ref` torch twin.

The engine calls them through `edgellm.kernels.ops`, which dispatches per DESIGN.md (dispatch.py):
CUDA tensors run the Triton kernel, CPU tensors the reference, or the Triton kernel when
TRITON_INTERPRET=1. The op files themselves (`kernels.rms_norm`, `kernels.attention`, ...) expose
the launcher and the reference directly, for tests and benchmarks.
"""

from . import ops
from ._triton import HAS_TRITON
from .dispatch import KernelOp, forbid_reference_on_cuda, interpreter_on, use_reference
from .rope import rope_inv_freq

__all__ = ["ops", "HAS_TRITON", "KernelOp", "forbid_reference_on_cuda", "interpreter_on", "use_reference",
           "rope_inv_freq"]
