"""kernels/tree_accept.py: walking a token tree along the target's choices. Against the torch reference
(`_ref`) on fresh random inputs of several shapes, odd sizes included (tests/kernel_cases.py: the
interpreter on the CPU, compiled kernels on a GPU)."""

import random

import pytest
import torch

from edgellm.kernels import tree_accept

from kernel_cases import DEVICE, random_trees


@pytest.mark.parametrize("t", [1, 4, 16])
def test_accept_tree(t):
    parents, nodes, tokens = random_trees(6, t, seed=10 + t, vocab=4)
    # Targets that follow the tree for a while: each node's target is one of its children's tokens
    # (or a token no child has), so paths of every length occur.
    rng = random.Random(t)
    targets = torch.tensor([[rng.randrange(5) for _ in range(t)] for _ in range(6)], device=DEVICE)
    path, count, out = tree_accept.accept_tree(tokens, parents, nodes, targets)
    path_ref, count_ref, out_ref = tree_accept.accept_tree_ref(tokens, parents, nodes, targets)
    assert torch.equal(count, count_ref)
    for b in range(6):
        n = int(count_ref[b]) + 1
        assert torch.equal(path[b, :n], path_ref[b, :n]) and torch.equal(out[b, :n], out_ref[b, :n])


def test_accept_tree_walks_the_matching_branch():
    # root -> a(5) -> c(7); root -> b(6) -> d(8). Targets pick b after the root, then d, then 9.
    parents = torch.tensor([[-1, 0, 0, 1, 2]], dtype=torch.int32, device=DEVICE)
    tokens = torch.tensor([[0, 5, 6, 7, 8]], device=DEVICE)
    targets = torch.tensor([[6, 1, 8, 1, 9]], device=DEVICE)
    path, count, out = tree_accept.accept_tree(tokens, parents, torch.tensor([5], dtype=torch.int32, device=DEVICE),
                                               targets)
    assert count.tolist() == [2] and path[0, :3].tolist() == [0, 2, 4] and out[0, :3].tolist() == [6, 8, 9]
