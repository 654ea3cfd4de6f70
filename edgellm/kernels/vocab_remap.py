"""Map token ids of a reduced vocabulary back to ids of the full vocabulary."""

import torch


def vocab_remap_ref(ids: torch.Tensor, reduced_to_full: torch.Tensor) -> torch.Tensor:
    """ids: int tensor of reduced-vocabulary ids; reduced_to_full: [reduced_vocab] full ids."""
    return reduced_to_full[ids.long()].to(torch.int64)
