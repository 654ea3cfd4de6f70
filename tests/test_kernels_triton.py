"""Every Triton kernel against its torch reference (`_ref`), on fresh random inputs of several
shapes, odd sizes included. On CPU this runs under TRITON_INTERPRET=1 (set in conftest); on a GPU
(bench/gpu_check.sh) the same tests run the compiled kernels on CUDA tensors."""

import pytest
import torch

from edgellm.kernels import attention, kv_append, rms_norm, rope, sampling, silu_mul, vocab_remap  # the op files

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter computes in numpy, which has no bfloat16: bfloat16 is checked on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 96), (1, 1000)])
def test_rms_norm(dtype, shape):
    x, w, r = randn(*shape, dtype=dtype), randn(shape[-1], dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=2)
    torch.testing.assert_close(rms_norm.rms_norm(x, w, 1e-6), rms_norm.rms_norm_ref(x, w, 1e-6), **TOL[dtype])
    y, s = rms_norm.add_rms_norm(x, r, w, 1e-5)
    y_ref, s_ref = rms_norm.add_rms_norm_ref(x, r, w, 1e-5)
    torch.testing.assert_close(s, s_ref, **TOL[dtype])
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    # Sandwich norm (Gemma): the sublayer output normalised by its own weight before the add.
    pre = randn(shape[-1], dtype=dtype, seed=3)
    y, s = rms_norm.add_rms_norm(x, r, w, 1e-5, pre_weight=pre)
    y_ref, s_ref = rms_norm.add_rms_norm_ref(x, r, w, 1e-5, pre_weight=pre)
    torch.testing.assert_close(s, s_ref, **TOL[dtype])
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(s_ref, rms_norm.rms_norm_ref(x, pre, 1e-5) + r)


def test_rms_norm_on_strided_heads():
    """q/k norm runs on a [B, S, H, D] view cut out of the fused qkv output."""
    qkv = randn(2, 3, 4 * 12 + 2 * 2 * 12)
    q = qkv[..., :48].reshape(2, 3, 4, 12)
    w = randn(12, seed=3)
    torch.testing.assert_close(rms_norm.rms_norm(q, w, 1e-6), rms_norm.rms_norm_ref(q, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 2 * 48), (2, 3, 2 * 1500)])
def test_silu_mul(dtype, shape):
    x = randn(*shape, dtype=dtype)
    torch.testing.assert_close(silu_mul.silu_mul(x), silu_mul.silu_mul_ref(x), **TOL[dtype])
    gelu = silu_mul.silu_mul(x, activation="gelu_tanh")  # GeGLU (Gemma)
    torch.testing.assert_close(gelu, silu_mul.silu_mul_ref(x, activation="gelu_tanh"), **TOL[dtype])
    gate, up = x.float().chunk(2, dim=-1)
    torch.testing.assert_close(gelu.float(), torch.nn.functional.gelu(gate, approximate="tanh") * up, **TOL[dtype])


def test_vocab_remap():
    table = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).to(DEVICE) + 5000
    ids = torch.randint(0, 1000, (3, 77), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert torch.equal(vocab_remap.vocab_remap(ids, table), vocab_remap.vocab_remap_ref(ids, table))


@pytest.mark.parametrize("rotary_dim,theta,scaling", [
    (64, 10000.0, None), (32, 1e6, None),
    (128, 5e5, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192})])
def test_rope_cos_sin_cache(rotary_dim, theta, scaling):
    inv_freq = rope.rope_inv_freq(rotary_dim, theta, scaling).to(DEVICE)
    cos, sin = rope.rope_cos_sin_cache(inv_freq, 777)
    cos_ref, sin_ref = rope.rope_cos_sin_cache_ref(inv_freq, 777)
    torch.testing.assert_close(cos, cos_ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(sin, sin_ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,head_dim,rotary_dim", [(4, 4, 64, 64), (8, 2, 48, 48), (8, 1, 96, 64),
                                                         (4, 1, 128, 128)])
def test_apply_rope(dtype, hq, hkv, head_dim, rotary_dim):
    batch, seq = 2, 5
    qkv = randn(batch, seq, (hq + 2 * hkv) * head_dim, dtype=dtype)
    q = qkv[..., :hq * head_dim].reshape(batch, seq, hq, head_dim)  # strided, like the model's
    k = qkv[..., hq * head_dim:(hq + hkv) * head_dim].reshape(batch, seq, hkv, head_dim)
    cos, sin = rope.rope_cos_sin_cache_ref(rope.rope_inv_freq(rotary_dim, 10000.0).to(DEVICE), 64)
    positions = torch.tensor([[0, 1, 2, 3, 4], [17, 18, 19, 20, 21]], device=DEVICE)
    q_out, k_out = rope.apply_rope(q, k, cos, sin, positions)
    q_ref, k_ref = rope.apply_rope_ref(q, k, cos, sin, positions)
    torch.testing.assert_close(q_out, q_ref, **TOL[dtype])
    torch.testing.assert_close(k_out, k_ref, **TOL[dtype])


@pytest.mark.parametrize("tokens", [None, 2])  # 2: several token blocks per row, some past a row's length
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_append(dtype, tokens):
    k_cache = torch.zeros(4, 2, 40, 48, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k, v = randn(3, 7, 2, 48, dtype=dtype), randn(3, 7, 2, 48, dtype=dtype, seed=1)
    slots, starts, lens = (torch.tensor(x, dtype=torch.int32, device=DEVICE) for x in ([3, 0, 2], [5, 0, 33], [7, 2, 1]))
    kr, vr = k_cache.clone(), v_cache.clone()
    kv_append.kv_append(k_cache, v_cache, k, v, slots, starts, lens, tokens=tokens)
    kv_append.kv_append_ref(kr, vr, k, v, slots, starts, lens)
    assert torch.equal(k_cache, kr) and torch.equal(v_cache, vr)


def _cache_with_lengths(lengths, hkv, capacity, head_dim, dtype, seed=0):
    k_cache = randn(len(lengths) + 1, hkv, capacity, head_dim, dtype=dtype, seed=seed)
    v_cache = randn(len(lengths) + 1, hkv, capacity, head_dim, dtype=dtype, seed=seed + 1)
    return k_cache, v_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,head_dim", [(4, 4, 64), (8, 2, 48), (8, 1, 96), (2, 2, 128), (8, 1, 64),
                                            (8, 2, 128)])
@pytest.mark.parametrize("splits,pack", [(None, None), (1, None), (3, None), (1, True), (3, True)])
def test_prefill_attention(dtype, hq, hkv, head_dim, splits, pack):
    """Rows of several lengths after cached prefixes of several lengths (one longer than a key split,
    one of none), padded queries; the keys in one range or split in 3 and merged; each program's rows
    one query head's or (pack) every head's of a KV group."""
    starts, q_lens, seq = [0, 130, 3], [37, 9, 1], 37
    k_cache, v_cache = _cache_with_lengths([50, 150, 50], hkv, 160, head_dim, dtype)
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


@pytest.mark.skipif(attention.TensorDescriptor is None, reason="needs triton >= 3.4 (TMA descriptors)")
@pytest.mark.parametrize("hq,hkv,head_dim", [(4, 4, 64), (8, 2, 48), (8, 1, 96)])
@pytest.mark.parametrize("splits,pack", [(1, None), (3, True)])
def test_prefill_attention_tma(hq, hkv, head_dim, splits, pack):
    """K/V tiles through TMA descriptors over the whole cache: a tile past a row's keys holds the next
    head's or slot's values (NaN here past each slot's keys), which the masked blocks must keep out;
    head_dim 48 and 96 are zero-filled to the tile's 64 and 128."""
    dtype = torch.float16
    starts, q_lens, seq = [0, 130, 3], [37, 9, 1], 37
    k_cache, v_cache = _cache_with_lengths([50, 150, 50], hkv, 160, head_dim, dtype)
    for slot, keys in ((1, 37), (3, 139), (0, 4), (2, 0)):
        k_cache[slot, :, keys:] = v_cache[slot, :, keys:] = float("nan")
    q = randn(3, seq, hq, head_dim, dtype=dtype, seed=5)
    args = (torch.tensor([1, 3, 0], device=DEVICE), torch.tensor(starts, device=DEVICE),
            torch.tensor(q_lens, device=DEVICE), head_dim ** -0.5)
    out = attention.prefill_attention(q, k_cache, v_cache, *args, tile=(32, 16, 4, 2), num_splits=splits, pack=pack,
                                      tma=True)
    torch.testing.assert_close(out, attention.prefill_attention_ref(q, k_cache, v_cache, *args), **TOL[dtype])
    with pytest.raises(ValueError, match="contiguous"):
        attention.prefill_attention(q, k_cache[:, :, :100], v_cache[:, :, :100], *args, tma=True)


@pytest.mark.skipif(DEVICE != "cuda", reason="a long chunk's default tiles (over 1024 queries): too slow interpreted")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,head_dim", [(8, 2, 64), (16, 2, 128), (6, 2, 96)])
def test_prefill_attention_long_chunks_default_tiles(dtype, hq, hkv, head_dim):
    """Chunks of over LONG_PREFILL_QUERIES queries take the 128-row packed tiles: one from position 0,
    one after a 301-token prefix, one padded row; GQA 4 and 8, and a group of 3 (no packing)."""
    starts, q_lens, seq = [0, 301, 0], [1100, 1037, 0], 1100
    assert seq > attention.LONG_PREFILL_QUERIES
    k_cache, v_cache = _cache_with_lengths([1400] * 3, hkv, 1400, head_dim, dtype)
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
    k_cache, v_cache = _cache_with_lengths(lengths, hkv, 160, head_dim, dtype)
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
    k_cache, v_cache = _cache_with_lengths([90, 90, 90], hkv, 96, head_dim, dtype)
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


def _sampling_params(batch, temperature, top_k, top_p):
    return (torch.full((batch,), temperature, device=DEVICE), torch.full((batch,), top_k, dtype=torch.int32, device=DEVICE),
            torch.full((batch,), top_p, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("vocab", [50, 1000, 4099])
def test_sampling_greedy_and_same_draws_as_reference(dtype, vocab):
    """Greedy rows equal the argmax; sampled rows draw, from the same counter-based numbers, the same
    tokens as the reference except where float summation order moves a cdf boundary (rare)."""
    batch = 16
    logits = (randn(batch, vocab, seed=vocab) * 3).to(dtype)
    temperature = torch.tensor([0.0, 1.0] * (batch // 2), device=DEVICE)
    top_k = torch.tensor([0, 1, 0, 5, 40, 0, 7, 0] * 2, dtype=torch.int32, device=DEVICE)
    top_p = torch.tensor([1.0, 1.0, 0.9, 1.0, 0.5, 1.0, 0.8, 0.95] * 2, device=DEVICE)
    seeds = torch.arange(batch, device=DEVICE) * 11
    offsets = torch.full((batch,), 3, device=DEVICE)
    out = sampling.sample(logits, temperature, top_k, top_p, seeds, offsets)
    ref = sampling.sample_ref(logits, temperature, top_k, top_p, seeds, offsets)
    greedy = (temperature == 0) | (top_k == 1)
    assert torch.equal(out[greedy], logits.float().argmax(-1)[greedy])
    assert (out == ref).float().mean() >= 0.85


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 6, 0.7)])
def test_sampling_distribution(temperature, top_k, top_p):
    from test_sampling import CHI2_9999, hf_distribution

    logits = randn(1, 12, seed=3) * 1.5
    expected = hf_distribution(logits.cpu(), temperature, top_k, top_p)[0]
    n = 20000 if DEVICE == "cuda" else 500  # the interpreter runs one row at a time
    rows = logits.expand(n, -1).contiguous()
    tokens = sampling.sample(rows, *_sampling_params(n, temperature, top_k, top_p),
                             torch.full((n,), 99, device=DEVICE), torch.arange(n, device=DEVICE))
    counts = torch.bincount(tokens.cpu(), minlength=12).double()
    allowed = expected > 0
    assert counts[~allowed].sum() == 0
    wanted = expected[allowed].double() * n
    chi2 = ((counts[allowed] - wanted) ** 2 / wanted).sum().item()
    dof = int(allowed.sum()) - 1
    if dof:
        assert chi2 < CHI2_9999[dof - 1]


def test_sampling_never_leaves_the_allowed_set():
    batch, vocab = 24, 700
    logits = randn(batch, vocab, seed=11) * 4
    g = torch.Generator().manual_seed(2)
    temperature = (torch.rand(batch, generator=g) + 0.3).to(DEVICE)
    top_k = torch.randint(0, 30, (batch,), generator=g, dtype=torch.int32).to(DEVICE)
    top_p = (torch.rand(batch, generator=g) * 0.9 + 0.05).to(DEVICE)
    tokens = sampling.sample(logits, temperature, top_k, top_p, torch.arange(batch, device=DEVICE),
                             torch.zeros(batch, device=DEVICE))
    allowed = sampling.filtered_probs_ref(logits, temperature, top_k, top_p) > 0
    assert allowed[torch.arange(batch, device=DEVICE), tokens].all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,bias", [(1, 40, 96, False), (3, 33, 70, True), (16, 64, 256, False)])
def test_gemv(dtype, m, n, k, bias):
    from edgellm.kernels import gemv

    x, w = randn(m, k, dtype=dtype), randn(n, k, dtype=dtype, seed=1)
    b = randn(n, dtype=dtype, seed=2) if bias else None
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gemv.gemv(x, w, b), gemv.gemv_ref(x, w, b), **tol)
    torch.testing.assert_close(gemv.gemv(x, w, b, tile=(16, 32, 4, 2)), gemv.gemv_ref(x, w, b), **tol)
    if m == 1:  # one row goes to the CUDA cores by default; the tensor-core tile when asked
        torch.testing.assert_close(gemv.gemv(x, w, b, tile=(16, 32, 4, 2), row_fma=False), gemv.gemv_ref(x, w, b),
                                   **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (3, 34, 70), (16, 64, 256)])
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_gemv_fused_norm_glu_residual(dtype, m, n, k, quant):
    """The decode step's neighbours fused into the GEMV (RMSNorm in front; SiLU/GELU * up or the
    residual add behind) against the same ops run separately, on the CUDA cores (one row) and on the
    tensor-core tile."""
    from edgellm.kernels import gemv
    from edgellm.quant import quantize

    if quant == "int4" and k % 32:
        pytest.skip("int4 GEMV tiles are whole blocks of 32 columns")
    x, nw = randn(m, k, dtype=dtype), 1 + 0.1 * randn(k, dtype=dtype, seed=5)
    w, w2 = randn(2 * n, k, seed=1) / k ** 0.5, randn(n, k, seed=2) / k ** 0.5  # outputs of order 1
    if quant:
        w, w2 = quantize(w, quant, dtype=dtype), quantize(w2, quant, dtype=dtype)
    else:
        w, w2 = w.to(dtype), w2.to(dtype)
    bias, residual = randn(n, dtype=dtype, seed=3), randn(m, n, dtype=dtype, seed=4)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    normed = rms_norm.rms_norm_ref(x, nw, 1e-5)
    expected_glu = silu_mul.silu_mul_ref(gemv.gemv_ref(normed, w))
    expected_res = gemv.gemv_ref(x, w2, bias) + residual
    for row_fma in ([True, False] if m == 1 else [False]):
        tiles = [None, (8, 64, 4, 2)] if quant != "int4" else [None]
        for tile in tiles:
            out = gemv.gemv(x, w, norm=(nw, 1e-5), glu="silu", tile=tile, row_fma=row_fma)
            assert out.shape == (m, n)
            torch.testing.assert_close(out, expected_glu, **tol)
            torch.testing.assert_close(gemv.gemv(x, w2, bias, residual=residual, tile=tile, row_fma=row_fma),
                                       expected_res, **tol)
    # The norm's statistics from the GEMV that wrote x (sumsq_out) instead of a pass over x (norm_sumsq).
    sums = torch.zeros(m, dtype=torch.float32, device=DEVICE)
    out = gemv.gemv(x, w2, bias, residual=residual, sumsq_out=sums)
    torch.testing.assert_close(sums, out.float().square().sum(-1), rtol=1e-4, atol=1e-4)
    ref_sums = torch.zeros_like(sums)
    gemv.gemv_ref(x, w2, bias, residual=residual, sumsq_out=ref_sums)
    torch.testing.assert_close(sums, ref_sums, rtol=5e-2, atol=1e-1)
    torch.testing.assert_close(gemv.gemv(x, w, norm=(nw, 1e-5), norm_sumsq=x.float().square().sum(-1), glu="silu",
                                         row_fma=False), expected_glu, **tol)
    with pytest.raises(ValueError, match="norm_sumsq"):
        gemv.gemv(x, w2, norm_sumsq=sums)
    with pytest.raises(ValueError, match="sumsq_out"):
        gemv.gemv(x, w2, sumsq_out=sums.double())
    gelu = gemv.gemv(x[None], w, glu="gelu_tanh")
    torch.testing.assert_close(gelu, silu_mul.silu_mul_ref(gemv.gemv_ref(x[None], w), activation="gelu_tanh"), **tol)
    torch.testing.assert_close(gemv.gemv_ref(x, w, norm=(nw, 1e-5), glu="silu"), expected_glu)
    with pytest.raises(ValueError, match="residual"):
        gemv.gemv(x, w2, residual=residual[:, :-1])
    with pytest.raises(ValueError, match="glu"):
        gemv.gemv(x, randn(2 * n - 1, k, dtype=dtype), glu="silu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq,hq,hkv,head_dim", [(1, 1, 4, 2, 16), (3, 1, 4, 1, 32), (2, 3, 6, 2, 16)])
def test_gemv_fused_rope_append(dtype, batch, seq, hq, hkv, head_dim):
    """The qkv projection with RMSNorm in front and RoPE + the KV append behind (gemv rope_append)
    against rope_kv_append_ref over the separate projection, from two equal caches; row 1 of the
    3-token chunk is padded (its last token writes no key or value)."""
    from edgellm.kernels import gemv

    k, capacity = 40, 12
    x, nw = randn(batch, seq, k, dtype=dtype), 1 + 0.1 * randn(k, dtype=dtype, seed=5)
    w = (randn((hq + 2 * hkv) * head_dim, k, seed=1) / k ** 0.5).to(dtype)
    cos, sin = rope.rope_cos_sin_cache_ref(rope.rope_inv_freq(head_dim, 10000.0).to(DEVICE), capacity)
    caches = [randn(4, hkv, capacity, head_dim, dtype=dtype, seed=s) for s in (6, 7)]
    mine, ref = [c.clone() for c in caches], [c.clone() for c in caches]
    slots = torch.tensor([2, 0, 3][:batch], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([0, 5, capacity - seq][:batch], dtype=torch.int32, device=DEVICE)
    lengths = torch.tensor([seq, max(seq - 1, 1), seq][:batch], dtype=torch.int32, device=DEVICE)
    spec = gemv.RopeAppend(cos, sin, *mine, slots, starts, lengths, hq)
    q = gemv.gemv(x, w, norm=(nw, 1e-5), rope_append=spec)
    q_ref = gemv.gemv_ref(x, w, norm=(nw, 1e-5), rope_append=spec._replace(k_cache=ref[0], v_cache=ref[1]))
    assert q.shape == (batch, seq, hq * head_dim)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(mine[0], ref[0], **tol)
    torch.testing.assert_close(mine[1], ref[1], **tol)
    if batch * seq == 1:  # the tensor-core tile for one row too
        again = [c.clone() for c in caches]
        torch.testing.assert_close(gemv.gemv(x, w, norm=(nw, 1e-5), row_fma=False,
                                             rope_append=spec._replace(k_cache=again[0], v_cache=again[1])), q_ref, **tol)
        torch.testing.assert_close(again[0], ref[0], **tol)
    with pytest.raises(ValueError, match="rope_append"):
        gemv.gemv(x, w[:-head_dim], rope_append=spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv,head_dim,rotary_dim,seq", [(4, 2, 64, 64, 5), (8, 1, 96, 64, 1), (6, 2, 48, 48, 4)])
def test_rope_kv_append(dtype, hq, hkv, head_dim, rotary_dim, seq):
    from edgellm.kernels import rope_append

    batch, capacity = 3, 24
    qkv = randn(batch, seq, (hq + 2 * hkv) * head_dim, dtype=dtype)
    q = qkv[..., :hq * head_dim].reshape(batch, seq, hq, head_dim)  # strided views, like the model's
    k = qkv[..., hq * head_dim:(hq + hkv) * head_dim].reshape(batch, seq, hkv, head_dim)
    v = qkv[..., (hq + hkv) * head_dim:].reshape(batch, seq, hkv, head_dim)
    cos, sin = rope.rope_cos_sin_cache_ref(rope.rope_inv_freq(rotary_dim, 10000.0).to(DEVICE), capacity)
    k_cache = randn(batch + 1, hkv, capacity, head_dim, dtype=dtype, seed=3)
    v_cache = randn(batch + 1, hkv, capacity, head_dim, dtype=dtype, seed=4)
    slots, starts = (torch.tensor(x, dtype=torch.int32, device=DEVICE) for x in ([2, 0, 3], [0, 7, capacity - seq]))
    lens = torch.tensor([seq, max(seq - 2, 1), seq], dtype=torch.int32, device=DEVICE)  # row 1 padded
    kr, vr = k_cache.clone(), v_cache.clone()
    q_out = rope_append.rope_kv_append(q, k, v, cos, sin, k_cache, v_cache, slots, starts, lens)
    q_ref = rope_append.rope_kv_append_ref(q, k, v, cos, sin, kr, vr, slots, starts, lens)
    torch.testing.assert_close(q_out, q_ref, **TOL[dtype])
    torch.testing.assert_close(k_cache, kr, **TOL[dtype])
    assert torch.equal(v_cache, vr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("index,k,segments,rank", [
    ([2, -1, 0, 1], 40, (24, 8, 8), 16),        # decode rows on three adapters and none; qkv-like segments
    ([1] * 19 + [-1] * 5 + [0] * 13, 600, (50, 50), 16),  # prefill tokens of three rows, K over three splits
    ([0, 0, 0], 96, (33,), 32),                 # one adapter for every row, one segment, a larger rank
    ([-1, -1], 64, (16,), 16),                  # no adapter at all: y untouched
    ([5, 0, 4, -1, 1, 2, 3, 5], 64, (16, 16), 16),  # six adapters in one batch: past the unrolled four
])
def test_lora_shrink_expand(dtype, index, k, segments, rank):
    from edgellm.kernels import lora

    adapters, n, groups, m = max(3, max(index) + 1), sum(segments), len(segments), len(index)
    x = randn(m, k, dtype=dtype)
    a_stack = randn(adapters, groups * rank, k, dtype=dtype, seed=1) * 0.3
    b_stack = randn(adapters, n, rank, dtype=dtype, seed=2) * 0.3
    scale = torch.tensor([0.5, 2.0, 1.25, 0.75, 1.5, 3.0][:adapters], device=DEVICE)
    used = lora.used_slots(index, adapters, DEVICE)
    index = torch.tensor(index, dtype=torch.int32, device=DEVICE)
    t = lora.lora_shrink(x, a_stack, index, used)
    t_ref = lora.lora_shrink_ref(x, a_stack, index, used)
    has = index >= 0
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(t.sum(0)[has], t_ref.sum(0)[has], **tol)
    y = randn(m, n, dtype=dtype, seed=3)
    expected = lora.lora_expand_ref(y, t_ref, b_stack, index, used, scale, segments)
    out = lora.lora_expand(y.clone(), t_ref, b_stack, index, used, scale, segments)
    torch.testing.assert_close(out, expected, **tol)
    assert torch.equal(out[~has], y[~has])  # zero-rank gating: rows without an adapter are untouched
    assert not torch.equal(out[has], y[has]) or not has.any()


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,bias", [(1, 40, 576, False), (5, 33, 192, True)])
def test_gemv_over_packed_weights(kind, dtype, m, n, k, bias):
    """The dequantizing GEMV against the reference (linear over the dequantized weight); K = 576 has a
    ragged last int4 group (4 x 128 + 64), K = 192 a group of 128 then one of 64."""
    from edgellm.kernels import gemv
    from edgellm.quant import dequantize, quantize

    x, w = randn(m, k, dtype=dtype), randn(n, k, seed=1)
    b = randn(n, dtype=dtype, seed=2) if bias else None
    qw = quantize(w, kind, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    ref = gemv.gemv_ref(x, qw, b)
    torch.testing.assert_close(gemv.gemv(x, qw, b), ref, **tol)
    torch.testing.assert_close(gemv.gemv(x, qw, b, tile=(16, 64, 4, 2)), ref, **tol)
    if m == 1:  # batch 1 defaults to the CUDA cores: the tensor-core tile too, and a K tile over two int4
        # groups (256 = 2 x 128, over the ragged 4 x 128 + 64)
        torch.testing.assert_close(gemv.gemv(x, qw, b, row_fma=False), ref, **tol)
        torch.testing.assert_close(gemv.gemv(x, qw, b, tile=(8, 256, 4, 2), row_fma=True), ref, **tol)
    torch.testing.assert_close(ref, torch.nn.functional.linear(x, dequantize(qw, dtype), b))
    # the prefill path's one-pass unpacking
    from edgellm.kernels import dequantize as dequantize_kernel
    assert torch.equal(dequantize_kernel.dequantize(qw, dtype), dequantize_kernel.dequantize_ref(qw, dtype))
    # and the quantization is close to the weight it packs (round to nearest)
    error = (dequantize(qw, torch.float32) - w).norm() / w.norm()
    assert error < {"int8": 0.01, "fp8": 0.04, "int4": 0.12}[kind]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slots", [
    [3, -1, 0, 3, 1],  # three adapters and none: the first (prefetched) adapter and the looped ones
    [3],               # batch 1: all of the epilogue prefetched before the K loop
    [-1, -1],          # no adapter: the plain GEMV
    [-1],              # batch 1 with no adapter
])
def test_gemv_with_lora_epilogue(dtype, slots):
    """At decode sizes the LoRA expand is the GEMV's epilogue: the same as gemv + lora_expand."""
    from edgellm.kernels import gemv, lora

    m, k, segments, rank = len(slots), 96, (40, 12, 12), 16
    n = sum(segments)
    x, w, bias = randn(m, k, dtype=dtype), randn(n, k, dtype=dtype, seed=1) * 0.2, randn(n, dtype=dtype, seed=2)
    a_stack = randn(4, 3 * rank, k, dtype=dtype, seed=3) * 0.2
    b_stack = randn(4, n, rank, dtype=dtype, seed=4) * 0.2
    used = lora.used_slots(slots, 4, DEVICE)
    index = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    scale = torch.tensor([1.0, 0.5, 0.0, 2.0], device=DEVICE)
    spec = (lora.lora_shrink(x, a_stack, index, used), b_stack, index, used, scale, segments)
    out = gemv.gemv(x, w, bias, tile=(16, 32, 4, 2), lora=spec)
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(out, gemv.gemv_ref(x, w, bias, lora=spec), **tol)
    if m == 1:  # the batch-1 CUDA-core path keeps the epilogue
        torch.testing.assert_close(gemv.gemv(x, w, bias, tile=(8, 32, 4, 2), lora=spec, row_fma=True),
                                   gemv.gemv_ref(x, w, bias, lora=spec), **tol)
    base = gemv.gemv_ref(x, w, bias)
    for row, slot in enumerate(slots):
        if slot < 0:  # no adapter: the plain GEMV
            torch.testing.assert_close(out[row], base[row], **tol)
        else:  # adapter 3 (scale 2): a real delta
            assert slot != 3 or not torch.allclose(out[row], base[row], **tol)


def _fused_shrink_case(rows, k, gr, seed=5):
    """An A stack of three adapters and an index with rows on adapters 2, none, 0, 2, ... (rows of
    the decode batches the fused LoRA shrinks serve)."""
    from edgellm.kernels import lora

    a_stack = randn(3, gr, k, seed=seed) * 0.3
    slots = [(2, -1, 0)[i % 3] for i in range(rows)]
    index = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    return a_stack, index, lora.used_slots(slots, 3, DEVICE)


def _check_fused_shrink(t, t_ref, index, dtype):
    has = index >= 0
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(t.sum(0)[has], t_ref.sum(0)[has], **tol)
    assert t_ref.sum(0)[has].abs().max() > 0.1  # a real product, not zeros on both sides


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,gr,residual", [(40, 48, True), (600, 16, True), (96, 32, False), (600, 16, "pre")])
def test_rms_norm_with_fused_lora_shrink(dtype, n, gr, residual):
    """The next projection's LoRA shrink computed by the norm kernel: outputs unchanged, partials = ref
    ("pre": with a sandwich norm in front of the add too)."""
    rows = 4
    x, r, w = randn(rows, n, dtype=dtype), randn(rows, n, dtype=dtype, seed=1), randn(n, dtype=dtype, seed=2)
    a_stack, index, used = _fused_shrink_case(rows, n, gr)
    a_stack = a_stack.to(dtype)
    if residual:
        pre = randn(n, dtype=dtype, seed=3) if residual == "pre" else None
        y, s, t = rms_norm.add_rms_norm(x, r, w, 1e-5, pre_weight=pre, lora_a=(a_stack, index, used))
        y_ref, s_ref, t_ref = rms_norm.add_rms_norm_ref(x, r, w, 1e-5, pre_weight=pre, lora_a=(a_stack, index, used))
        torch.testing.assert_close(s, s_ref, **TOL[dtype])
    else:
        y, t = rms_norm.rms_norm(x, w, 1e-5, lora_a=(a_stack, index, used))
        y_ref, t_ref = rms_norm.rms_norm_ref(x, w, 1e-5, lora_a=(a_stack, index, used))
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    assert t.shape[0] == -(-n // 256)  # one K split per chunk of 256 columns
    _check_fused_shrink(t, t_ref, index, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("gr", [16, 48])  # 48: more A rows than the preloaded tile holds (16 at 1024 columns)
def test_silu_mul_with_fused_lora_shrink(dtype, gr):
    rows, n_ffn = 3, 1100  # two blocks of 1024: two K splits, the second partial
    gate_up = randn(rows, 2 * n_ffn, dtype=dtype)
    a_stack, index, used = _fused_shrink_case(rows, n_ffn, gr)
    y, t = silu_mul.silu_mul(gate_up, lora_a=(a_stack.to(dtype), index, used))
    y_ref, t_ref = silu_mul.silu_mul_ref(gate_up, lora_a=(a_stack.to(dtype), index, used))
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    _check_fused_shrink(t, t_ref, index, dtype)


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
    a_stack, index, used = _fused_shrink_case(batch, hq * head_dim, 16)
    lora_a = (a_stack.to(dtype), index, used)
    out, t = attention.decode_attention(q, k_cache, v_cache, slots, lens, 0.125, num_splits=2, lora_a=lora_a)
    out_ref, t_ref = attention.decode_attention_ref(q, k_cache, v_cache, slots, lens, 0.125, lora_a=lora_a)
    torch.testing.assert_close(out, out_ref, **TOL[dtype])
    assert t.shape[0] == hq
    _check_fused_shrink(t, t_ref, index, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,head_dim", [(4, 16), (8, 48)])
def test_kv_blocks_to_and_from_slots(dtype, tokens, head_dim):
    """Saved blocks into cache slots at scattered block positions (and out again into other places)
    against the references, on caches that start equal; the slots' other positions and the other
    slots stay as they were. The table has room for more entries than its count (as in the prefill
    graph, where a stale tail is left from earlier steps): those are not copied."""
    from edgellm.kernels import kv_blocks

    layers, slots, heads, capacity = 2, 3, 2, 6 * tokens
    pool = randn(5, layers, 2, heads, tokens, head_dim, dtype=dtype, seed=1)
    cache = randn(layers, 2, slots, heads, capacity, head_dim, dtype=dtype, seed=2)
    entries = [(3, 0, 1), (0, 2, 1), (4, 5, 1), (1, 1, 2)]
    stale = [(2, 4, 0)] * 20  # 24 entries of room: more than one SPLIT of programs
    table = torch.tensor(kv_blocks.block_table(entries + stale), dtype=torch.int32, device=DEVICE)
    table[0] = len(entries)
    mine, ref = cache.clone(), cache.clone()
    kv_blocks.blocks_to_slot(pool, mine, table)
    kv_blocks.blocks_to_slot_ref(pool, ref, table)
    assert torch.equal(mine, ref)
    assert torch.equal(mine[:, :, 1, :, 2 * tokens:3 * tokens], pool[0])
    assert torch.equal(mine[:, :, 2, :, tokens:2 * tokens], pool[1])
    assert torch.equal(mine[:, :, 1, :, tokens:2 * tokens], cache[:, :, 1, :, tokens:2 * tokens])
    assert torch.equal(mine[:, :, 0], cache[:, :, 0])  # the stale entries' slot
    per_layer = cache.clone()  # a layer at a time, fewer programs (the host tier's copy beside the layers)
    for layer in range(layers):
        kv_blocks.blocks_to_slot(pool, per_layer, table, layer=layer, split=3)
    assert torch.equal(per_layer, ref)
    out, out_ref = pool.clone(), pool.clone()
    back = torch.tensor(kv_blocks.block_table([(4, 5, 2), (2, 0, 0)]), dtype=torch.int32, device=DEVICE)
    kv_blocks.blocks_from_slot(out, cache, back)
    kv_blocks.blocks_from_slot_ref(out_ref, cache, back)
    assert torch.equal(out, out_ref)
    assert torch.equal(out[4], cache[:, :, 2, :, 5 * tokens:6 * tokens])
    assert torch.equal(out[2], cache[:, :, 0, :, :tokens])
    assert torch.equal(out[1], pool[1])
    with pytest.raises(ValueError, match="kv_blocks"):
        kv_blocks.blocks_to_slot(pool[:, :, :, :1], mine, table)
    with pytest.raises(ValueError, match="block table"):
        kv_blocks.blocks_to_slot(pool, mine, table.long())
