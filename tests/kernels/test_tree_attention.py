"""kernels/tree_attention.py: split-K attention of token trees. Against the torch reference (`_ref`) on fresh
random inputs of several shapes, odd sizes included (tests/kernel_cases.py: the interpreter on the CPU,
compiled kernels on a GPU)."""

import pytest
import torch

from edgellm.kernels import attention, tree_attention, tree_mask

from kernel_cases import DEVICE, TOL, randn, random_trees


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,head_dim,t", [(4, 4, 64, 16), (8, 2, 48, 5), (9, 3, 64, 8)])
def test_tree_attention(dtype, hq, hkv, head_dim, t):
    parents, nodes, _ = random_trees(3, t, seed=4)
    bits, _ = tree_mask.tree_mask_ref(parents, nodes)
    k_cache = randn(4, hkv, 200, head_dim, dtype=dtype)
    v_cache = randn(4, hkv, 200, head_dim, dtype=dtype, seed=1)
    q = randn(3, t, hq, head_dim, dtype=dtype, seed=2)
    args = (torch.tensor([1, 3, 0], device=DEVICE), torch.tensor([0, 21, 170], device=DEVICE), nodes)
    out = tree_attention.tree_attention(q, k_cache, v_cache, *args, bits, head_dim ** -0.5, num_splits=3)
    ref = tree_attention.tree_attention_ref(q, k_cache, v_cache, *args, bits, head_dim ** -0.5)
    for b in range(3):
        n = int(nodes[b])
        torch.testing.assert_close(out[b, :n], ref[b, :n], **TOL[dtype])
    assert torch.isfinite(out).all()  # padding nodes too
    # A chain's tree attention is causal attention over the chunk.
    chain = tree_mask.mask_to_bits(torch.ones(3, t, t, dtype=torch.bool, device=DEVICE).tril())
    full = torch.full((3,), t, dtype=torch.int32, device=DEVICE)
    causal = attention.prefill_attention_ref(q, k_cache, v_cache, *args[:2], full, head_dim ** -0.5)
    torch.testing.assert_close(tree_attention.tree_attention(q, k_cache, v_cache, *args[:2], full, chain,
                                                             head_dim ** -0.5), causal, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tree_attention_with_a_sliding_window(dtype):
    """Each node's window is measured from the position it takes once accepted: a chain's tree
    attention under a window is causal windowed attention over the chunk."""
    t, window, hq, hkv, head_dim = 8, 11, 4, 2, 32
    parents, nodes, _ = random_trees(3, t, seed=5)
    bits, _ = tree_mask.tree_mask_ref(parents, nodes)
    k_cache, v_cache = randn(4, hkv, 120, head_dim, dtype=dtype), randn(4, hkv, 120, head_dim, dtype=dtype, seed=1)
    q = randn(3, t, hq, head_dim, dtype=dtype, seed=2)
    args = (torch.tensor([1, 3, 0], device=DEVICE), torch.tensor([0, 21, 100], device=DEVICE), nodes)
    out = tree_attention.tree_attention(q, k_cache, v_cache, *args, bits, head_dim ** -0.5, window, num_splits=2)
    ref = tree_attention.tree_attention_ref(q, k_cache, v_cache, *args, bits, head_dim ** -0.5, window)
    for b in range(3):
        n = int(nodes[b])
        torch.testing.assert_close(out[b, :n], ref[b, :n], **TOL[dtype])
    assert torch.isfinite(out).all()
    chain = tree_mask.mask_to_bits(torch.ones(3, t, t, dtype=torch.bool, device=DEVICE).tril())
    full = torch.full((3,), t, dtype=torch.int32, device=DEVICE)
    causal = attention.prefill_attention_ref(q, k_cache, v_cache, *args[:2], full, head_dim ** -0.5, window)
    torch.testing.assert_close(tree_attention.tree_attention(q, k_cache, v_cache, *args[:2], full, chain,
                                                             head_dim ** -0.5, window), causal, **TOL[dtype])
    with pytest.raises(ValueError, match="longer than the tree"):
        tree_attention.tree_attention(q, k_cache, v_cache, *args, bits, head_dim ** -0.5, t)
