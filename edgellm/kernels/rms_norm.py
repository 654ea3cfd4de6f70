"""RMSNorm, and RMSNorm with the residual add fused in front of it (and optionally, for sandwich-norm
models such as Gemma, the RMSNorm of the sublayer output before the add: pre_weight); optionally
with the next projection's LoRA shrink fused behind it.

Kernel: one program per row; the row is loaded once, statistics in float32. The fused variant
writes both the normalised row and the new residual (x + residual) in the same pass.

With `lora_a=(a_stack, index, used)` (decode-sized batches, kernels/lora.py) each row gets
`splits` programs: each computes the row's statistics, writes one CHUNK of the outputs, and the
shrink's partial sum over that chunk for the row's adapter (none for a row without one). Returns
the outputs plus the shrink's [splits, rows, G*R] partials, which the projection's GEMV consumes.
"""

import torch

from ._triton import pdl_release, pdl_wait, pow2, tl, triton, use_pdl
from .lora import fused_shrink_args, lora_shrink_ref, shrink_finish, shrink_tile

LORA_CHUNK = 256  # columns per program when the LoRA shrink is fused


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, pre_ptr, out_ptr, res_out_ptr, n_cols, eps,
                     a_ptr, idx_ptr, t_ptr, gr, s_as, s_ar, s_tsplit, s_tm,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, HAS_LORA: tl.constexpr,
                     CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr, HAS_PRE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    out_mask = mask
    if HAS_LORA:  # this program writes the columns of its chunk only, and their shrink partial
        lo = tl.program_id(1) * CHUNK
        out_mask = mask & (cols >= lo) & (cols < lo + CHUNK)
        c = lo + tl.arange(0, CHUNK)
        c_ok = c < n_cols
        adapter = tl.load(idx_ptr + row)
        a_tile = shrink_tile(a_ptr, adapter, c, c_ok, gr, s_as, s_ar, BLOCK_R)  # before the wait: see shrink_tile
    pdl_wait(PDL)
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_PRE:  # the sublayer output's own RMSNorm, before the residual add
        xp = x.to(tl.float32)
        pre_rstd = 1.0 / tl.sqrt(tl.sum(xp * xp, axis=0) / n_cols + eps)
        x = (xp * pre_rstd).to(x.dtype) * tl.load(pre_ptr + cols, mask=mask, other=0.0)
    if HAS_LORA:  # the chunk's inputs again (a tensor cannot be sliced), loaded alongside the row
        xc = tl.load(x_ptr + row * n_cols + c, mask=c_ok, other=0.0)
        if HAS_PRE:
            xc = (xc.to(tl.float32) * pre_rstd).to(xc.dtype) * tl.load(pre_ptr + c, mask=c_ok, other=0.0)
        if HAS_RESIDUAL:
            xc = xc + tl.load(res_ptr + row * n_cols + c, mask=c_ok, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=out_mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (x32 * rstd).to(x.dtype) * w
    if HAS_LORA:
        yc = (xc.to(tl.float32) * rstd).to(x.dtype) * tl.load(w_ptr + c, mask=c_ok, other=0.0)
        shrink_finish(a_tile, yc, c, c_ok, a_ptr, adapter, gr, s_as, s_ar,
                      t_ptr + tl.program_id(1) * s_tsplit + row * s_tm, BLOCK_R)
    pdl_release(PDL)
    tl.store(out_ptr + row * n_cols + cols, y, mask=out_mask)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match last dim of x {tuple(x.shape)}")


def _launch(x, residual, weight, eps, num_warps=None, lora_a=None, pre_weight=None):
    _check(x, weight)
    if pre_weight is not None:
        _check(x, pre_weight)
    x = x.contiguous()
    n = x.shape[-1]
    rows = x.numel() // n
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    res = residual.contiguous() if residual is not None else x
    block = pow2(n)
    pdl = use_pdl(x)  # few warps per row: H100 sweep at 4096 x 2048 gave 2 warps 79%, 8 warps 65% of bandwidth
    warps = num_warps or max(1 if lora_a is None else 4, min(8, block // 1024))  # 4 for the A tile
    chunk = block if lora_a is None else min(LORA_CHUNK, block)  # one program per row without LoRA
    splits = triton.cdiv(n, chunk)
    t, lora_args, constants = fused_shrink_args(lora_a, rows, n, splits, chunk, x)
    _rms_norm_kernel[(rows, splits)](x, res, weight, weight if pre_weight is None else pre_weight, out, res_out, n,
                                     eps, *lora_args, HAS_RESIDUAL=residual is not None, BLOCK=block,
                                     HAS_LORA=lora_a is not None, CHUNK=chunk, **constants, PDL=pdl,
                                     HAS_PRE=pre_weight is not None, num_warps=warps, launch_pdl=pdl > 0)
    return out, res_out, t


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, num_warps: int | None = None, lora_a=None):
    """num_warps overrides the default (benchmarks). lora_a: see the module doc; then returns (y, t)."""
    out, _, t = _launch(x, None, weight, eps, num_warps, lora_a)
    return out if lora_a is None else (out, t)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 pre_weight: torch.Tensor | None = None, lora_a=None):
    """Returns (rms_norm(x + residual), x + residual), plus the LoRA shrink's partials with lora_a;
    with pre_weight, x is rms_norm(x, pre_weight) first (a sandwich norm, same eps)."""
    if residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} != x {tuple(x.shape)}")
    out, res_out, t = _launch(x, residual, weight, eps, lora_a=lora_a, pre_weight=pre_weight)
    return (out, res_out) if lora_a is None else (out, res_out, t)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, *, num_warps: int | None = None, lora_a=None):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, statistics in float32.

    Matches HF's LlamaRMSNorm: normalise in float32, cast back to x's dtype, then scale.
    With lora_a: (y, lora_shrink_ref(y, *lora_a)).
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * normed.to(x.dtype)
    return y if lora_a is None else (y, lora_shrink_ref(y, *lora_a))


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                     pre_weight: torch.Tensor | None = None, lora_a=None):
    """Returns (rms_norm(x + residual), x + residual): the pre-norm block's two outputs; with lora_a
    also lora_shrink_ref of the first; with pre_weight, x is rms_norm(x, pre_weight) first."""
    if pre_weight is not None:
        x = rms_norm_ref(x, pre_weight, eps)
    summed = x + residual
    y = rms_norm_ref(summed, weight, eps)
    return (y, summed) if lora_a is None else (y, summed, lora_shrink_ref(y, *lora_a))
