"""RMSNorm, and RMSNorm with the residual add fused in front of it."""

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, statistics in float32.

    Matches HF's LlamaRMSNorm: normalise in float32, cast back to x's dtype, then scale.
    """
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Returns (rms_norm(x + residual), x + residual): the pre-norm block's two outputs."""
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed
