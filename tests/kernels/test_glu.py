"""kernels/glu.py: act(gate) * up (SwiGLU, GeGLU), alone and with the down projection's LoRA shrink. Against
the torch reference (`_ref`) on fresh random inputs of several shapes, odd sizes included
(tests/kernel_cases.py: the interpreter on the CPU, compiled kernels on a GPU)."""

import pytest
import torch

from edgellm.kernels import glu

from kernel_cases import DTYPES, TOL, check_fused_shrink, fused_shrink_case, randn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 2 * 48), (2, 3, 2 * 1500)])
def test_glu(dtype, shape):
    x = randn(*shape, dtype=dtype)
    torch.testing.assert_close(glu.glu(x), glu.glu_ref(x), **TOL[dtype])
    gelu = glu.glu(x, activation="gelu_tanh")  # GeGLU (Gemma)
    torch.testing.assert_close(gelu, glu.glu_ref(x, activation="gelu_tanh"), **TOL[dtype])
    gate, up = x.float().chunk(2, dim=-1)
    torch.testing.assert_close(gelu.float(), torch.nn.functional.gelu(gate, approximate="tanh") * up, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gr", [16, 48])  # 48: more A rows than the preloaded tile holds (16 at 1024 columns)
def test_glu_with_fused_lora_shrink(dtype, gr):
    rows, n_ffn = 3, 1100  # two blocks of 1024: two K splits, the second partial
    gate_up = randn(rows, 2 * n_ffn, dtype=dtype)
    a_stack, index, used = fused_shrink_case(rows, n_ffn, gr)
    y, t = glu.glu(gate_up, lora_a=(a_stack.to(dtype), index, used))
    y_ref, t_ref = glu.glu_ref(gate_up, lora_a=(a_stack.to(dtype), index, used))
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    check_fused_shrink(t, t_ref, index, dtype)
