"""kernels/matmul.py over packed int4 weights (prefill without a dequantized copy): against its reference
(linear over the dequantized weight) with a ragged last group (K = 576 = 4 x 128 + 64), odd row and
feature counts, a bias; the halves from bits (and in a compiled kernel their PTX) give the same bits."""

import pytest
import torch

from edgellm.kernels import matmul
from edgellm.kernels.dispatch import run_with

from kernel_cases import DEVICE, randn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,group", [(37, 40, 576, 128), (5, 33, 192, 64)])
def test_int4_matmul_equals_the_dequantized_linear(dtype, m, n, k, group):
    from edgellm.quant import quantize

    x, b = randn(m, k, dtype=dtype), randn(n, dtype=dtype, seed=2)
    qw = quantize(randn(n, k, seed=1) / k ** 0.5, "int4", group=group, dtype=dtype)
    tile = (16, 32, 64, 4, 2)
    ref = matmul.matmul_ref(x, qw, b)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    out = matmul.matmul(x, qw, b, tile=tile)
    torch.testing.assert_close(out, ref, **tol)
    # K tiles of the whole group (576 in tiles of 128 leaves a part-tile: its loads masked by column too)
    torch.testing.assert_close(matmul.matmul(x, qw, b, tile=(16, 32, group, 4, 2)), ref, **tol)
    if dtype == torch.float16:
        for codes in ("f16", "ptx"):
            with run_with(int4_codes=codes):
                halves = matmul.matmul(x, qw, b, tile=tile)
            assert torch.equal(halves, out), codes  # (the same exact codes into the same dots)
    # a row's bits do not depend on the rows around it (the batch-invariant prefill's promise, packed too)
    assert torch.equal(matmul.matmul(x[:3], qw, b, tile=tile), out[:3])


def test_int4_matmul_refuses_what_it_cannot_read():
    from edgellm.quant import quantize

    x = randn(4, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="not int8"):
        matmul.matmul(x, quantize(randn(8, 64), "int8", dtype=torch.float16))
    with pytest.raises(ValueError, match="does not fit"):
        matmul.matmul(randn(4, 32, dtype=torch.float16), quantize(randn(8, 64), "int4", group=32, dtype=torch.float16))
    assert DEVICE in ("cpu", "cuda")
