"""Batch invariance (RunSettings.batch_invariant, deterministic decoding): each kernel gives a row the same
bits whatever rows run beside it, however many, wherever it sits, and wherever its chunk starts. Rows
alone against the same rows inside bigger batches of other random rows, compared bitwise (the interpreter
on the CPU, compiled kernels on a GPU); kernels/matmul.py also against its reference."""

import pytest
import torch

from edgellm.kernels import attention, gemv, matmul
from edgellm.kernels.dispatch import run_with

from kernel_cases import DEVICE, TOL, cache_with_lengths, randn

# Small tiles in the interpreter (programs run one after another); the kernel's own on a GPU.
MATMUL_TILE = (16, 16, 32, 4, 2) if DEVICE == "cpu" else None
# The interpreter's dot is numpy's BLAS, whose register blocking rounds a tile's rows by their place in
# it (a tensor core's MMA does not): float32 only on a GPU, and on the CPU chunks that start at a tile's
# first row (the kernels' own choices, key blocks and tiles, are what the CPU checks).
DTYPES = [torch.float16] + ([torch.float32] if DEVICE != "cpu" else [])
CHUNK_STARTS = [64] if DEVICE == "cpu" else [64, 50, 1]


def invariant():
    return run_with(batch_invariant=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_matches_its_reference_and_gives_a_row_the_same_bits_in_any_batch(dtype):
    k, n = 72, 40  # (K and N not multiples of the tiles)
    w, b = randn(n, k, dtype=dtype, seed=1), randn(n, dtype=dtype, seed=2)
    x = randn(37, k, dtype=dtype, seed=3)
    y = matmul.matmul(x, w, b, tile=MATMUL_TILE)
    torch.testing.assert_close(y, matmul.matmul_ref(x, w, b), **TOL[dtype])
    alone = matmul.matmul(x[5:6], w, b, tile=MATMUL_TILE)
    assert torch.equal(y[5:6], alone)
    assert torch.equal(matmul.matmul(x[3:20], w, b, tile=MATMUL_TILE)[2:3], alone)  # (another place, another block)
    assert matmul.matmul(x[None, :4], w, tile=MATMUL_TILE).shape == (1, 4, n)
    with pytest.raises(ValueError, match="does not fit"):
        matmul.matmul(x[:, :-1], w)
    with pytest.raises(ValueError, match="bias"):
        matmul.matmul(x, w, b[:-1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_gives_a_row_the_same_bits_alone_and_among_up_to_twenty(dtype):
    """One row takes the tensor-core tile too (not the CUDA cores' order), and rows past 16 go to more
    programs of the same tile: any batch size gives each row its bits."""
    k, n = 96, 40
    w, nw = randn(2 * n, k, dtype=dtype, seed=1) / k ** 0.5, 1 + 0.1 * randn(k, dtype=dtype, seed=2)
    x = randn(20, k, dtype=dtype, seed=3)
    with invariant():
        alone = gemv.gemv(x[7:8], w, norm=(nw, 1e-5), glu="silu")
        for rows in (x[:8], x[4:16], x):
            at = 7 - (4 if rows.shape[0] == 12 else 0)
            assert torch.equal(gemv.gemv(rows, w, norm=(nw, 1e-5), glu="silu")[at:at + 1], alone)
        full = gemv.gemv(x, w, norm=(nw, 1e-5), glu="silu")
    torch.testing.assert_close(full, gemv.gemv_ref(x, w, norm=(nw, 1e-5), glu="silu"), **TOL[dtype])
    # The sums of squares in parts (no atomics), read back by the next GEMV, whatever the batch.
    w2 = randn(k, k, dtype=dtype, seed=4) / k ** 0.5
    with invariant():
        def two_steps(rows):
            sums = torch.zeros(gemv.sumsq_parts(w2, rows.shape[0]), rows.shape[0], device=DEVICE)
            h = gemv.gemv(rows, w2, residual=rows, sumsq_out=sums)
            return gemv.gemv(h, w, norm=(nw, 1e-5), norm_sumsq=sums, glu="silu")
        assert torch.equal(two_steps(x)[7:8], two_steps(x[7:8]))
        expected = gemv.gemv_ref(gemv.gemv_ref(x, w2, residual=x), w, norm=(nw, 1e-5), glu="silu")
        torch.testing.assert_close(two_steps(x), expected, **TOL[dtype])  # (the parts' tree sums them all)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cut", CHUNK_STARTS)
def test_prefill_attention_gives_a_query_the_same_bits_in_any_chunk(dtype, cut):
    """A query's output over its keys: whether its prompt is prefilled whole, in a later chunk after a
    cached prefix (the reused-prefix case), or beside another row of another length."""
    hq, hkv, head_dim, length = 4, 2, 64, 70
    k_cache, v_cache = cache_with_lengths([length, length], hkv, 96, head_dim, dtype)
    v_cache[1], k_cache[1] = v_cache[0], k_cache[0]  # (slot 1: the same prompt's keys)
    q = randn(1, length, hq, head_dim, dtype=dtype, seed=5)
    scale = head_dim ** -0.5

    def run(q_rows, slots, starts, q_lens):
        return attention.prefill_attention(q_rows, k_cache, v_cache, torch.tensor(slots, device=DEVICE),
                                           torch.tensor(starts, device=DEVICE), torch.tensor(q_lens, device=DEVICE),
                                           scale)

    with invariant():
        whole = run(q, [0], [0], [length])
        later = run(q[:, cut:].contiguous(), [1], [cut], [length - cut])  # after a "reused" prefix
        other = randn(1, length, hq, head_dim, dtype=dtype, seed=6)
        beside = run(torch.cat([other[:, :length - cut], q[:, cut:]]), [0, 1], [0, cut], [length - cut, length - cut])
    assert torch.equal(whole[:, cut:], later)
    assert torch.equal(beside[1:], later)
    torch.testing.assert_close(whole, attention.prefill_attention_ref(
        q, k_cache, v_cache, torch.tensor([0], device=DEVICE), torch.tensor([0], device=DEVICE),
        torch.tensor([length], device=DEVICE), scale), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_gives_a_row_the_same_bits_in_any_batch(dtype):
    hq, hkv, head_dim = 8, 2, 64
    lengths = [90, 17, 150, 64, 3]
    k_cache, v_cache = cache_with_lengths(lengths, hkv, 160, head_dim, dtype)
    q = randn(len(lengths), hq, head_dim, dtype=dtype, seed=5)

    def run(rows):
        return attention.decode_attention(q[rows], k_cache, v_cache, torch.tensor(rows, device=DEVICE),
                                          torch.tensor([lengths[r] for r in rows], device=DEVICE), head_dim ** -0.5)

    with invariant():
        alone = run([2])
        assert torch.equal(run([0, 1, 2, 3, 4])[2:3], alone)
        assert torch.equal(run([4, 2])[1:2], alone)
