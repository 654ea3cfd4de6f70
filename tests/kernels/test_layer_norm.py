"""kernels/layer_norm.py: LayerNorm (GPT-2, ViTs), with the residual add. Against the torch reference (`_ref`)
on fresh random inputs of several shapes, odd sizes included (tests/kernel_cases.py: the interpreter on the
CPU, compiled kernels on a GPU)."""

import pytest
import torch

from edgellm.kernels import layer_norm

from kernel_cases import DEVICE, DTYPES, TOL, randn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 80), (1, 1000)])
def test_layer_norm(dtype, shape):
    x, r = randn(*shape, dtype=dtype), randn(*shape, dtype=dtype, seed=1)
    w, b = randn(shape[-1], dtype=dtype, seed=2), randn(shape[-1], dtype=dtype, seed=3)
    torch.testing.assert_close(layer_norm.layer_norm(x, w, b, 1e-6), layer_norm.layer_norm_ref(x, w, b, 1e-6),
                               **TOL[dtype])
    y, s = layer_norm.add_layer_norm(x, r, w, b, 1e-5)
    y_ref, s_ref = layer_norm.add_layer_norm_ref(x, r, w, b, 1e-5)
    torch.testing.assert_close(s, s_ref, **TOL[dtype])
    torch.testing.assert_close(y, y_ref, **TOL[dtype])


def test_layer_norm_matches_torch_module():
    x = randn(4, 48)
    ln = torch.nn.LayerNorm(48, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        ln.weight.copy_(randn(48, seed=5))
        ln.bias.copy_(randn(48, seed=6))
        torch.testing.assert_close(layer_norm.layer_norm(x, ln.weight, ln.bias, 1e-6), ln(x))
