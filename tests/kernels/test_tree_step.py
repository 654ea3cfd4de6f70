"""kernels/tree_step.py: a verify step's inputs from the packed trees, and its commit. Against the torch
reference (`_ref`) on fresh random inputs of several shapes, odd sizes included (tests/kernel_cases.py: the
interpreter on the CPU, compiled kernels on a GPU)."""

import pytest
import torch

from edgellm.kernels import tree_step

from kernel_cases import DEVICE, randn, random_trees


def _packed_trees(batch, t, seed, vocab):
    parents, nodes, tokens = random_trees(batch, t, seed, vocab)
    tokens[:, 0] = 999  # node 0's packed token is a placeholder: the root comes from `roots`
    return torch.cat([tokens, parents.long(), nodes.long()[:, None]], 1).contiguous()


@pytest.mark.parametrize("t", [1, 5, 16, 64])
def test_tree_inputs(t):

    batch, vocab, hidden, scratch = 3, 40, 24, 5
    packed = _packed_trees(batch, t, seed=t, vocab=vocab)
    roots = torch.tensor([7, 8, 9], device=DEVICE)
    lengths = torch.tensor([4, 11, 0, 2, 30, 17], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([1, scratch, 4], dtype=torch.int32, device=DEVICE)  # the middle row is padding
    offsets = torch.tensor([3, 0, 100], device=DEVICE)
    embed = randn(vocab + 1000, hidden, seed=2)
    got = tree_step.tree_inputs(packed, roots, lengths, slots, offsets, embed, scratch)
    want = tree_step.tree_inputs_ref(packed, roots, lengths, slots, offsets, embed, scratch)
    for name, a, b in zip(want._fields, got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert got.starts.tolist() == [11, 0, 30] and got.tokens[:, 0].tolist() == [7, 8, 9]


def test_tree_commit():

    t, scratch = 6, 3
    count = torch.tensor([0, 4, 2], dtype=torch.int32, device=DEVICE)
    out = torch.arange(18, device=DEVICE).view(3, t) + 100
    starts = torch.tensor([5, 9, 0], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([2, 0, scratch], dtype=torch.int32, device=DEVICE)
    states = []
    for fn in (tree_step.tree_commit, tree_step.tree_commit_ref):
        lengths = torch.tensor([1, 1, 1, 1], dtype=torch.int32, device=DEVICE)
        offsets = torch.tensor([10, 20, 30], device=DEVICE)
        last = torch.zeros(4, dtype=torch.int64, device=DEVICE)  # a padded batch: rows beyond B are untouched
        result = torch.zeros(4, t + 1, dtype=torch.int64, device=DEVICE)
        fn(count, out, starts, slots, lengths, offsets, last, result, scratch)
        states.append((lengths, offsets, last, result))
    for a, b in zip(*states):
        assert torch.equal(a, b)
    lengths, offsets, last, result = states[0]
    assert lengths.tolist() == [14, 1, 6, 1] and offsets.tolist() == [11, 25, 33]
    assert last.tolist() == [100, 110, 114, 0] and result[1].tolist() == [106, 107, 108, 109, 110, 111, 4]
