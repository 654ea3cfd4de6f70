"""Map token ids of a reduced vocabulary back to ids of the full vocabulary."""

import torch

from ._triton import tl, triton

_BLOCK = 256


@triton.jit
def _vocab_remap_kernel(ids_ptr, table_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ids = tl.load(ids_ptr + offs, mask=mask, other=0)
    full = tl.load(table_ptr + ids, mask=mask, other=0)
    tl.store(out_ptr + offs, full.to(tl.int64), mask=mask)


def vocab_remap(ids: torch.Tensor, reduced_to_full: torch.Tensor) -> torch.Tensor:
    flat = ids.contiguous().view(-1)
    out = torch.empty(flat.shape, dtype=torch.int64, device=ids.device)
    if flat.numel():
        _vocab_remap_kernel[(triton.cdiv(flat.numel(), _BLOCK),)](flat, reduced_to_full.contiguous(), out,
                                                                   flat.numel(), BLOCK=_BLOCK)
    return out.view(ids.shape)


def vocab_remap_ref(ids: torch.Tensor, reduced_to_full: torch.Tensor) -> torch.Tensor:
    """ids: int tensor of reduced-vocabulary ids; reduced_to_full: [reduced_vocab] full ids."""
    return reduced_to_full[ids.long()].to(torch.int64)
