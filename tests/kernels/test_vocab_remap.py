"""kernels/vocab_remap.py: reduced-vocabulary ids back to full ids. Against the torch reference (`_ref`) on
fresh random inputs of several shapes, odd sizes included (tests/kernel_cases.py: the interpreter on the
CPU, compiled kernels on a GPU)."""

import torch

from edgellm.kernels import vocab_remap

from kernel_cases import DEVICE


def test_vocab_remap():
    table = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).to(DEVICE) + 5000
    ids = torch.randint(0, 1000, (3, 77), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert torch.equal(vocab_remap.vocab_remap(ids, table), vocab_remap.vocab_remap_ref(ids, table))
