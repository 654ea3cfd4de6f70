"""kernels/lora.py: the LoRA shrink and expand, each row's adapter gathered by index. Against the torch
reference (`_ref`) on fresh random inputs of several shapes, odd sizes included (tests/kernel_cases.py: the
interpreter on the CPU, compiled kernels on a GPU)."""

import pytest
import torch

from edgellm.kernels import lora

from kernel_cases import DEVICE, TOL, randn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("index,k,segments,rank", [
    ([2, -1, 0, 1], 40, (24, 8, 8), 16),        # decode rows on three adapters and none; qkv-like segments
    ([1] * 19 + [-1] * 5 + [0] * 13, 600, (50, 50), 16),  # prefill tokens of three rows, K over three splits
    ([0, 0, 0], 96, (33,), 32),                 # one adapter for every row, one segment, a larger rank
    ([-1, -1], 64, (16,), 16),                  # no adapter at all: y untouched
    ([5, 0, 4, -1, 1, 2, 3, 5], 64, (16, 16), 16),  # six adapters in one batch: past the unrolled four
])
def test_lora_shrink_expand(dtype, index, k, segments, rank):

    adapters, n, groups, m = max(3, max(index) + 1), sum(segments), len(segments), len(index)
    x = randn(m, k, dtype=dtype)
    a_stack = randn(adapters, groups * rank, k, dtype=dtype, seed=1) * 0.3
    b_stack = randn(adapters, n, rank, dtype=dtype, seed=2) * 0.3
    scale = torch.tensor([0.5, 2.0, 1.25, 0.75, 1.5, 3.0][:adapters], device=DEVICE)
    used = lora.used_slots(index, adapters, DEVICE)
    index = torch.tensor(index, dtype=torch.int32, device=DEVICE)
    t = lora.lora_shrink(x, a_stack, index, used)
    t_ref = lora.lora_shrink_ref(x, a_stack, index, used)
    has = index >= 0
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(t.sum(0)[has], t_ref.sum(0)[has], **tol)
    y = randn(m, n, dtype=dtype, seed=3)
    expected = lora.lora_expand_ref(y, t_ref, b_stack, index, used, scale, segments)
    out = lora.lora_expand(y.clone(), t_ref, b_stack, index, used, scale, segments)
    torch.testing.assert_close(out, expected, **tol)
    assert torch.equal(out[~has], y[~has])  # zero-rank gating: rows without an adapter are untouched
    assert not torch.equal(out[has], y[has]) or not has.any()
