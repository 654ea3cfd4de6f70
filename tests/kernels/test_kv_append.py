"""kernels/kv_append.py: a chunk's keys and values into the linear cache. Against the torch reference (`_ref`)
on fresh random inputs of several shapes, odd sizes included (tests/kernel_cases.py: the interpreter on the
CPU, compiled kernels on a GPU)."""

import pytest
import torch

from edgellm.kernels import kv_append

from kernel_cases import DEVICE, randn


@pytest.mark.parametrize("tokens", [None, 2])  # 2: several token blocks per row, some past a row's length
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_append(dtype, tokens):
    k_cache = torch.zeros(4, 2, 40, 48, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k, v = randn(3, 7, 2, 48, dtype=dtype), randn(3, 7, 2, 48, dtype=dtype, seed=1)
    slots, starts, lens = (torch.tensor(x, dtype=torch.int32, device=DEVICE) for x in ([3, 0, 2], [5, 0, 33], [7, 2, 1]))
    kr, vr = k_cache.clone(), v_cache.clone()
    kv_append.kv_append(k_cache, v_cache, k, v, slots, starts, lens, tokens=tokens)
    kv_append.kv_append_ref(kr, vr, k, v, slots, starts, lens)
    assert torch.equal(k_cache, kr) and torch.equal(v_cache, vr)
