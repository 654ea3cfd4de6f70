"""The vision encoders' MLP activations, elementwise: "gelu" (exact, erf), "gelu_tanh" (tanh
approximation), "quick_gelu" (x * sigmoid(1.702 x), CLIP's and Qwen2-VL's ViT). Computed in float32,
stored in the input dtype. (The decoder's SwiGLU is glu.py.)"""

import torch
import torch.nn.functional as F

from ._triton import tl, triton

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}
BLOCK = 1024


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))  # in (0, 1]: no overflow
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _activation_kernel(x_ptr, out_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if KIND == 0:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif KIND == 1:
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    else:
        y = x / (1.0 + tl.exp(-1.702 * x))
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _code(kind: str) -> int:
    if kind not in _CODES:
        raise ValueError(f"activation: unknown kind {kind!r}; supported: {', '.join(ACTIVATIONS)}")
    return _CODES[kind]


def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    code = _code(kind)
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    _activation_kernel[(triton.cdiv(n, BLOCK),)](x, out, n, KIND=code, BLOCK=BLOCK, num_warps=4)
    return out


def activation_ref(x: torch.Tensor, kind: str) -> torch.Tensor:
    code = _code(kind)
    x32 = x.float()
    if code == 0:
        y = F.gelu(x32)
    elif code == 1:
        y = F.gelu(x32, approximate="tanh")
    else:
        y = x32 * torch.sigmoid(1.702 * x32)
    return y.to(x.dtype)
