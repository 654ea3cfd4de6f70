"""SiLU(gate) * up over the fused gate/up projection output.

Kernel: a 2D grid (row, block of F); gate and up of a row are read once, the product written once.
"""

import torch
import torch.nn.functional as F

from ._triton import tl, triton

_BLOCK = 1024


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, n_ffn, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_ffn
    gate = tl.load(gu_ptr + row * 2 * n_ffn + cols, mask=mask, other=0.0)
    up = tl.load(gu_ptr + row * 2 * n_ffn + n_ffn + cols, mask=mask, other=0.0)
    g32 = gate.to(tl.float32)
    act = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype)
    tl.store(out_ptr + row * n_ffn + cols, act * up, mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul: last dim {gate_up.shape[-1]} must be even (gate then up)")
    gate_up = gate_up.contiguous()
    n_ffn = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * n_ffn)
    out = torch.empty(*gate_up.shape[:-1], n_ffn, dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(rows, triton.cdiv(n_ffn, _BLOCK))](gate_up, out, n_ffn, BLOCK=_BLOCK, num_warps=4)
    return out


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [..., 2 * F] holding gate then up; returns silu(gate) * up, [..., F]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
