"""SiLU(gate) * up over the fused gate/up projection output."""

import torch
import torch.nn.functional as F


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [..., 2 * F] holding gate then up; returns silu(gate) * up, [..., F]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
