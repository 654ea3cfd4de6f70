"""kernels/segment_attention.py: block-diagonal attention over packed image segments. Against the torch
reference (`_ref`) on fresh random inputs of several shapes, odd sizes included (tests/kernel_cases.py: the
interpreter on the CPU, compiled kernels on a GPU)."""

import pytest
import torch

from edgellm.kernels import segment_attention

from kernel_cases import DEVICE, DTYPES, TOL, randn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("segments,head_dim", [([37], 16), ([5, 64, 1, 30], 80), ([16] * 6 + [9], 32)])
def test_segment_attention(dtype, segments, head_dim):
    n, heads = sum(segments), 3
    cu = [0]
    for s in segments:
        cu.append(cu[-1] + s)
    bounds, longest = segment_attention.segment_bounds(cu, DEVICE)
    qkv = randn(n, 3, heads, head_dim, dtype=dtype)
    q, k, v = qkv.unbind(1)  # strided views, as the encoders pass them
    scale = head_dim ** -0.5
    out = segment_attention.segment_attention(q, k, v, bounds, scale, longest)
    torch.testing.assert_close(out, segment_attention.segment_attention_ref(q, k, v, bounds, scale), **TOL[dtype])


def test_segment_attention_is_block_diagonal():
    """Each segment's output is attention over that segment alone, whatever is packed beside it."""
    q, k, v = (randn(20, 2, 16, seed=s) for s in range(3))
    bounds, longest = segment_attention.segment_bounds([0, 7, 20], DEVICE)
    out = segment_attention.segment_attention(q, k, v, bounds, 0.25, longest)
    alone, _ = segment_attention.segment_bounds([0, 13], DEVICE)
    tail = segment_attention.segment_attention(q[7:], k[7:], v[7:], alone, 0.25, 13)
    torch.testing.assert_close(out[7:], tail)
    probs = (torch.einsum("nhd,mhd->hnm", q[:7], k[:7]) * 0.25).softmax(-1)
    torch.testing.assert_close(out[:7], torch.einsum("hnm,mhd->nhd", probs, v[:7]))
