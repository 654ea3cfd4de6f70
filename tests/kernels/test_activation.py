"""kernels/activation.py: the element-wise activations (GELU variants, SiLU, ...). Against the torch reference
(`_ref`) on fresh random inputs of several shapes, odd sizes included (tests/kernel_cases.py: the
interpreter on the CPU, compiled kernels on a GPU)."""

import pytest
import torch

from edgellm.kernels import activation

from kernel_cases import DTYPES, TOL, randn


@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation(kind, dtype):
    x = randn(3, 1500, dtype=dtype) * 3
    torch.testing.assert_close(activation.activation(x, kind), activation.activation_ref(x, kind), **TOL[dtype])


def test_activation_matches_torch():
    x = randn(777) * 4
    torch.testing.assert_close(activation.activation(x, "gelu"), torch.nn.functional.gelu(x))
    torch.testing.assert_close(activation.activation(x, "gelu_tanh"),
                               torch.nn.functional.gelu(x, approximate="tanh"))
    with pytest.raises(ValueError, match="unknown kind"):
        activation.activation(x, "relu6")
