"""The gated MLP's activation: act(gate) * up over the fused gate/up projection's output, act SiLU
(SwiGLU) or, with activation="gelu_tanh", tanh-approximated GELU (GeGLU, Gemma's); optionally with the
down projection's LoRA shrink fused behind it.

Kernel: a 2D grid (row, block of F); gate and up of a row are read once, the product written once.
With `lora_a=(a_stack, index, used)` (kernels/lora.py) each program also writes the shrink's partial
sum over its block for the row's adapter: returns (product, [blocks, rows, G*R] partials).
"""

import torch
import torch.nn.functional as F

from ._triton import pdl_release, pdl_wait, tl, triton, use_pdl
from .activation import _tanh
from .lora import fused_shrink_args, lora_shrink_ref, shrink_finish, shrink_tile

_BLOCK = 1024
GATE_ACTIVATIONS = ("silu", "gelu_tanh")


@triton.jit
def gate_activation(gate, GELU: tl.constexpr):
    """SiLU (or tanh-approximated GELU) of the gate in float32, rounded to the gate's dtype (as
    transformers rounds it before the product with up)."""
    g32 = gate.to(tl.float32)
    if GELU:
        act = 0.5 * g32 * (1.0 + _tanh(0.7978845608028654 * (g32 + 0.044715 * g32 * g32 * g32)))
    else:
        act = g32 / (1.0 + tl.exp(-g32))
    return act.to(gate.dtype)


@triton.jit
def _glu_kernel(gu_ptr, out_ptr, n_ffn, a_ptr, idx_ptr, t_ptr, gr, s_as, s_ar, s_tsplit, s_tm,
                     BLOCK: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr,
                     GELU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_ffn
    if HAS_LORA:
        adapter = tl.load(idx_ptr + row)
        a_tile = shrink_tile(a_ptr, adapter, cols, mask, gr, s_as, s_ar, BLOCK_R)  # before the wait: see shrink_tile
    pdl_wait(PDL)
    gate = tl.load(gu_ptr + row * 2 * n_ffn + cols, mask=mask, other=0.0)
    up = tl.load(gu_ptr + row * 2 * n_ffn + n_ffn + cols, mask=mask, other=0.0)
    y = gate_activation(gate, GELU) * up
    if HAS_LORA:
        shrink_finish(a_tile, y, cols, mask, a_ptr, adapter, gr, s_as, s_ar,
                      t_ptr + tl.program_id(1) * s_tsplit + row * s_tm, BLOCK_R)
    pdl_release(PDL)
    tl.store(out_ptr + row * n_ffn + cols, y, mask=mask)


def _check_activation(activation: str) -> None:
    if activation not in GATE_ACTIVATIONS:
        raise ValueError(f"glu: unknown activation {activation!r}; supported: {', '.join(GATE_ACTIVATIONS)}")


def glu(gate_up: torch.Tensor, *, activation: str = "silu", lora_a=None):
    _check_activation(activation)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"glu: last dim {gate_up.shape[-1]} must be even (gate then up)")
    gate_up = gate_up.contiguous()
    n_ffn = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * n_ffn)
    out = torch.empty(*gate_up.shape[:-1], n_ffn, dtype=gate_up.dtype, device=gate_up.device)
    blocks = triton.cdiv(n_ffn, _BLOCK)
    t, lora_args, constants = fused_shrink_args(lora_a, rows, n_ffn, blocks, _BLOCK, out)
    pdl = use_pdl(gate_up)
    _glu_kernel[(rows, blocks)](gate_up, out, n_ffn, *lora_args, BLOCK=_BLOCK, HAS_LORA=lora_a is not None,
                                     **constants, PDL=pdl, GELU=activation == "gelu_tanh", num_warps=4,
                                     launch_pdl=pdl > 0)
    return out if lora_a is None else (out, t)


def glu_ref(gate_up: torch.Tensor, *, activation: str = "silu", lora_a=None):
    """gate_up: [..., 2 * F] holding gate then up; returns act(gate) * up, [..., F] (act: SiLU, or
    GELU with the tanh approximation); with lora_a also lora_shrink_ref of it."""
    _check_activation(activation)
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu(gate) if activation == "silu" else F.gelu(gate.float(), approximate="tanh").to(gate.dtype)
    y = act * up
    return y if lora_a is None else (y, lora_shrink_ref(y, *lora_a))
