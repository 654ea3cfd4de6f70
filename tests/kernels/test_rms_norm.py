"""kernels/rms_norm.py: RMSNorm, with the residual add and with the next projection's LoRA shrink fused in.
Against the torch reference (`_ref`) on fresh random inputs of several shapes, odd sizes included
(tests/kernel_cases.py: the interpreter on the CPU, compiled kernels on a GPU)."""

import pytest
import torch

from edgellm.kernels import rms_norm

from kernel_cases import DTYPES, TOL, check_fused_shrink, fused_shrink_case, randn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 96), (1, 1000)])
def test_rms_norm(dtype, shape):
    x, w, r = randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=2)
    torch.testing.assert_close(rms_norm.rms_norm(x, w, 1e-6), rms_norm.rms_norm_ref(x, w, 1e-6), **TOL[dtype])
    y, s = rms_norm.add_rms_norm(x, r, w, 1e-5)
    y_ref, s_ref = rms_norm.add_rms_norm_ref(x, r, w, 1e-5)
    torch.testing.assert_close(s, s_ref, **TOL[dtype])
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    # Sandwich norm (Gemma): the sublayer output normalised by its own weight before the add.
    pre = randn(shape[-1], dtype=dtype, seed=3)
    y, s = rms_norm.add_rms_norm(x, r, w, 1e-5, pre_weight=pre)
    y_ref, s_ref = rms_norm.add_rms_norm_ref(x, r, w, 1e-5, pre_weight=pre)
    torch.testing.assert_close(s, s_ref, **TOL[dtype])
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(s_ref, rms_norm.rms_norm_ref(x, pre, 1e-5) + r)


def test_rms_norm_on_strided_heads():
    """q/k norm runs on a [B, S, H, D] view cut out of the fused qkv output."""
    qkv = randn(2, 3, 4 * 12 + 2 * 2 * 12)
    q = qkv[..., :48].reshape(2, 3, 4, 12)
    w = randn(12, seed=3)
    torch.testing.assert_close(rms_norm.rms_norm(q, w, 1e-6), rms_norm.rms_norm_ref(q, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,gr,residual", [(40, 48, True), (600, 16, True), (96, 32, False), (600, 16, "pre")])
def test_rms_norm_with_fused_lora_shrink(dtype, n, gr, residual):
    """The next projection's LoRA shrink computed by the norm kernel: outputs unchanged, partials = ref
    ("pre": with a sandwich norm in front of the add too)."""
    rows = 4
    x, r, w = randn(rows, n, dtype=dtype), randn(rows, n, dtype=dtype, seed=1), randn(n, dtype=dtype, seed=2)
    a_stack, index, used = fused_shrink_case(rows, n, gr)
    a_stack = a_stack.to(dtype)
    if residual:
        pre = randn(n, dtype=dtype, seed=3) if residual == "pre" else None
        y, s, t = rms_norm.add_rms_norm(x, r, w, 1e-5, pre_weight=pre, lora_a=(a_stack, index, used))
        y_ref, s_ref, t_ref = rms_norm.add_rms_norm_ref(x, r, w, 1e-5, pre_weight=pre, lora_a=(a_stack, index, used))
        torch.testing.assert_close(s, s_ref, **TOL[dtype])
    else:
        y, t = rms_norm.rms_norm(x, w, 1e-5, lora_a=(a_stack, index, used))
        y_ref, t_ref = rms_norm.rms_norm_ref(x, w, 1e-5, lora_a=(a_stack, index, used))
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    assert t.shape[0] == -(-n // 256)  # one K split per chunk of 256 columns
    check_fused_shrink(t, t_ref, index, dtype)
