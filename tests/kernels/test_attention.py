"""kernels/attention.py: prefill (flash, split, packed, windowed) and decode (split-K) attention over the
cache. Against the torch reference (`_ref`) on fresh random inputs of several shapes, odd sizes included
(tests/kernel_cases.py: the interpreter on the CPU, compiled kernels on a GPU)."""

import pytest
import torch

from edgellm.kernels import attention

from kernel_cases import DEVICE, DTYPES, TOL, cache_with_lengths, check_fused_shrink, fused_shrink_case, randn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,head_dim", [(4, 4, 64), (8, 2, 48), (8, 1, 96), (2, 2, 128), (8, 1, 64),
                                            (8, 2, 128)])
@pytest.mark.parametrize("splits,pack", [(None, None), (1, None), (3, None), (1, True), (3, True)])
def test_prefill_attention(dtype, hq, hkv, head_dim, splits, pack):
    """Rows of several lengths after cached prefixes of several lengths (one longer than a key split,
    one of none), padded queries; the keys in one range or split in 3 and merged; each program's rows
    one query head's or (pack) every head's of a KV group."""
    starts, q_lens, seq = [0, 130, 3], [37, 9, 1], 37
    k_cache, v_cache = cache_with_lengths([50, 150, 50], hkv, 160, head_dim, dtype)
    q = randn(3, seq, hq, head_dim, dtype=dtype, seed=5)
    args = (torch.tensor([1, 3, 0], device=DEVICE), torch.tensor(starts, device=DEVICE),
            torch.tensor(q_lens, device=DEVICE), head_dim ** -0.5)
    out = attention.prefill_attention(q, k_cache, v_cache, *args, num_splits=splits, pack=pack)
    ref = attention.prefill_attention_ref(q, k_cache, v_cache, *args)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    if splits is None:  # 16-query blocks, some all padding (zeros from the kernel: its output starts empty,
        # here likely on the NaNs just freed); and the split sized by the keys the rows see
        del out
        torch.full((3 * seq * hq * head_dim,), float("nan"), dtype=dtype, device=DEVICE)
        out = attention.prefill_attention(q, k_cache, v_cache, *args, tile=(16, 16, 4, 2), num_splits=1)
        torch.testing.assert_close(out, ref, **TOL[dtype])
        # Query blocks taller than key blocks (two or three masked key blocks on the diagonal, a
        # cached prefix of 130 ending inside one) and shorter ones (a key block past the diagonal).
        for tile in ((32, 16, 4, 2), (16, 32, 4, 2)):
            torch.testing.assert_close(attention.prefill_attention(q, k_cache, v_cache, *args, tile=tile, num_splits=1),
                                       ref, **TOL[dtype])
        torch.testing.assert_close(attention.prefill_attention(q, k_cache, v_cache, *args, max_keys=139), ref,
                                   **TOL[dtype])


@pytest.mark.gpu  # a long chunk's default tiles (over 1024 queries): too slow interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,head_dim", [(8, 2, 64), (16, 2, 128), (6, 2, 96)])
def test_prefill_attention_long_chunks_default_tiles(dtype, hq, hkv, head_dim):
    """Chunks of over LONG_PREFILL_QUERIES queries take the 128-row packed tiles: one from position 0,
    one after a 301-token prefix, one padded row; GQA 4 and 8, and a group of 3 (no packing)."""
    starts, q_lens, seq = [0, 301, 0], [1100, 1037, 0], 1100
    assert seq > attention.LONG_PREFILL_QUERIES
    k_cache, v_cache = cache_with_lengths([1400] * 3, hkv, 1400, head_dim, dtype)
    q = randn(3, seq, hq, head_dim, dtype=dtype, seed=5)
    args = (torch.tensor([1, 3, 0], device=DEVICE), torch.tensor(starts, device=DEVICE),
            torch.tensor(q_lens, device=DEVICE), head_dim ** -0.5)
    torch.testing.assert_close(attention.prefill_attention(q, k_cache, v_cache, *args),
                               attention.prefill_attention_ref(q, k_cache, v_cache, *args), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,head_dim", [(4, 4, 64), (8, 2, 48), (8, 1, 96), (4, 1, 128)])
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_decode_attention(dtype, hq, hkv, head_dim, splits):
    """Splits past a row's keys (8 splits of 64-key blocks: rows of 1-129 keys fill 1-3) write no part;
    the merge must not read their (uninitialised) parts."""
    lengths = [1, 70, 129, 33]
    k_cache, v_cache = cache_with_lengths(lengths, hkv, 160, head_dim, dtype)
    q = randn(4, hq, head_dim, dtype=dtype, seed=7)
    slots = torch.tensor([4, 0, 2, 1], device=DEVICE)
    lens = torch.tensor(lengths, device=DEVICE)
    out = attention.decode_attention(q, k_cache, v_cache, slots, lens, head_dim ** -0.5, num_splits=splits)
    ref = attention.decode_attention_ref(q, k_cache, v_cache, slots, lens, head_dim ** -0.5)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [1, 7, 40])
def test_attention_with_a_sliding_window(dtype, window):
    """Prefill and decode under a sliding window shorter than the rows (so a query block's first key
    blocks are skipped and some queries see none of a block) match the references; the references
    match full attention over just the window's keys."""
    hq, hkv, head_dim = 4, 2, 32
    k_cache, v_cache = cache_with_lengths([90, 90, 90], hkv, 96, head_dim, dtype)
    starts, q_lens, seq = [0, 30, 5], [70, 9, 1], 70
    q = randn(3, seq, hq, head_dim, dtype=dtype, seed=5)
    args = (torch.tensor([1, 3, 0], device=DEVICE), torch.tensor(starts, device=DEVICE),
            torch.tensor(q_lens, device=DEVICE), head_dim ** -0.5)
    ref = attention.prefill_attention_ref(q, k_cache, v_cache, *args, window)
    for splits, pack in ((1, False), (3, False), (3, True)):
        torch.testing.assert_close(attention.prefill_attention(q, k_cache, v_cache, *args, window, num_splits=splits,
                                                               pack=pack), ref, **TOL[dtype])
    # Query 40 of row 0 over keys 40 - window + 1 .. 40 alone (moved to the start of a spare slot).
    lo = 40 - window + 1
    k_only, v_only = k_cache.clone(), v_cache.clone()
    k_only[2, :, :window], v_only[2, :, :window] = k_cache[1, :, lo:41], v_cache[1, :, lo:41]
    alone = attention.prefill_attention_ref(q[:1, 40:41], k_only, v_only, torch.tensor([2]), torch.tensor([window - 1]),
                                            torch.tensor([1]), head_dim ** -0.5)
    torch.testing.assert_close(ref[0, 40], alone[0, 0], **TOL[dtype])
    lens = torch.tensor([1, 70, 90], device=DEVICE)
    slots, qd = torch.tensor([2, 0, 1], device=DEVICE), randn(3, hq, head_dim, dtype=dtype, seed=7)
    for splits in (1, 3):
        torch.testing.assert_close(
            attention.decode_attention(qd, k_cache, v_cache, slots, lens, head_dim ** -0.5, window, num_splits=splits),
            attention.decode_attention_ref(qd, k_cache, v_cache, slots, lens, head_dim ** -0.5, window), **TOL[dtype])
    as_prefill = attention.prefill_attention_ref(qd[:, None], k_cache, v_cache, slots, lens - 1,
                                                 torch.ones(3, dtype=torch.int64), head_dim ** -0.5, window)
    torch.testing.assert_close(attention.decode_attention_ref(qd, k_cache, v_cache, slots, lens, head_dim ** -0.5, window),
                               as_prefill[:, 0], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 48])
def test_decode_attention_with_fused_lora_shrink(dtype, head_dim):
    """The o projection's shrink in the attention merge: one K split per query head."""
    batch, hq, hkv, capacity = 3, 4, 2, 40
    q = randn(batch, hq, head_dim, dtype=dtype)
    k_cache = randn(batch, hkv, capacity, head_dim, dtype=dtype, seed=1)
    v_cache = randn(batch, hkv, capacity, head_dim, dtype=dtype, seed=2)
    slots = torch.tensor([1, 0, 2], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([5, 40, 17], dtype=torch.int32, device=DEVICE)
    a_stack, index, used = fused_shrink_case(batch, hq * head_dim, 16)
    lora_a = (a_stack.to(dtype), index, used)
    out, t = attention.decode_attention(q, k_cache, v_cache, slots, lens, 0.125, num_splits=2, lora_a=lora_a)
    out_ref, t_ref = attention.decode_attention_ref(q, k_cache, v_cache, slots, lens, 0.125, lora_a=lora_a)
    torch.testing.assert_close(out, out_ref, **TOL[dtype])
    assert t.shape[0] == hq
    check_fused_shrink(t, t_ref, index, dtype)
