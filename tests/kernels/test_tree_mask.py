"""kernels/tree_mask.py: token-tree masks (ancestors and self). Against the torch reference (`_ref`) on fresh
random inputs of several shapes, odd sizes included (tests/kernel_cases.py: the interpreter on the CPU,
compiled kernels on a GPU)."""

import pytest
import torch

from edgellm.kernels import tree_mask

from kernel_cases import DEVICE, random_trees


@pytest.mark.parametrize("t", [5, 64])
def test_tree_mask_ref_is_ancestors_and_self(t):
    """The reference walk against a direct reading of the definition (and the bit conversions)."""
    parents, nodes, _ = random_trees(4, t, seed=t)
    bits, depth = tree_mask.tree_mask_ref(parents, nodes)
    mask = tree_mask.bits_to_mask(bits).cpu()
    for b in range(4):
        for i in range(t):
            chain, node = {i}, i
            while i < int(nodes[b]) and int(parents[b, node]) >= 0:
                node = int(parents[b, node])
                chain.add(node)
            assert set(torch.nonzero(mask[b, i]).flatten().tolist()) == chain and int(depth[b, i]) == len(chain) - 1
    assert torch.equal(tree_mask.mask_to_bits(tree_mask.bits_to_mask(bits)), bits)


def test_tree_mask_of_a_chain_is_causal():
    t = 7
    parents = torch.arange(-1, t - 1, dtype=torch.int32, device=DEVICE)[None]
    bits, depth = tree_mask.tree_mask_ref(parents, torch.tensor([t], dtype=torch.int32, device=DEVICE))
    assert torch.equal(tree_mask.bits_to_mask(bits)[0], torch.ones(t, t, dtype=torch.bool, device=DEVICE).tril())
    assert depth[0].tolist() == list(range(t))
