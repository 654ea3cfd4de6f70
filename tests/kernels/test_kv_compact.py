"""kernels/kv_compact.py: the accepted path's keys and values into consecutive positions. Against the torch
reference (`_ref`) on fresh random inputs of several shapes, odd sizes included (tests/kernel_cases.py: the
interpreter on the CPU, compiled kernels on a GPU)."""

import pytest
import torch

from edgellm.kernels import kv_compact, tree_accept

from kernel_cases import DEVICE, randn, random_trees


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_compact(dtype):
    t, batch = 8, 3
    parents, nodes, tokens = random_trees(batch, t, seed=3, vocab=3)
    targets = torch.randint(0, 4, (batch, t), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    path, count, _ = tree_accept.accept_tree_ref(tokens, parents, nodes, targets)
    path[0, 1:4], count[0] = torch.tensor([2, 5, 7]), 3  # a long non-chain path too
    cache = randn(2, 2, batch + 1, 3, 20, 12, dtype=dtype)
    original, expected = cache.clone(), cache.clone()
    slots = torch.tensor([3, 0, 1], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
    kv_compact.kv_compact(cache, slots, starts, path.to(DEVICE), count.to(DEVICE))
    kv_compact.kv_compact_ref(expected, slots, starts, path.to(DEVICE), count.to(DEVICE))
    assert torch.equal(cache, expected)
    assert torch.equal(cache[:, :, 3, :, 1:4], original[:, :, 3, :, torch.tensor([2, 5, 7])])
    assert torch.equal(cache[:, :, 2], original[:, :, 2])  # other slots untouched
