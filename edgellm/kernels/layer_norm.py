"""LayerNorm (mean and variance over the last dim, then weight and bias), and the same with the
residual add fused in front of it: the vision encoders' norms (Qwen2-VL ViT, InternViT, projectors).

Kernel: one program per row; the row is loaded once, statistics in float32, the normalised row is
cast back to the input dtype before the affine step (as torch's fp16 LayerNorm rounds once at the end,
results agree to fp16 rounding). The fused variant also writes x + residual, in the same pass.
"""

import torch
import torch.nn.functional as F

from ._triton import pow2, tl, triton


@triton.jit
def _layer_norm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, n_cols, eps,
                       HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    mean = tl.sum(x32, axis=0) / n_cols
    centred = tl.where(mask, x32 - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (centred * rstd * w + b).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, bias, eps):
    n = x.shape[-1]
    if weight.shape != (n,) or bias.shape != (n,):
        raise ValueError(f"layer_norm: weight {tuple(weight.shape)} / bias {tuple(bias.shape)} do not match "
                         f"the last dim of x {tuple(x.shape)}")
    x = x.contiguous()
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    block = pow2(n)
    _layer_norm_kernel[(x.numel() // n,)](x, residual.contiguous() if residual is not None else x, weight, bias, out,
                                          res_out, n, eps, HAS_RESIDUAL=residual is not None, BLOCK=block,
                                          num_warps=max(1, min(8, block // 512)))
    return out, res_out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return _launch(x, None, weight, bias, eps)[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """Returns (layer_norm(x + residual), x + residual)."""
    if residual.shape != x.shape:
        raise ValueError(f"add_layer_norm: residual {tuple(residual.shape)} != x {tuple(x.shape)}")
    return _launch(x, residual, weight, bias, eps)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """torch's LayerNorm over the last dim, computed in float32, returned in x's dtype."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def add_layer_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       eps: float):
    summed = x + residual
    return layer_norm_ref(summed, weight, bias, eps), summed
