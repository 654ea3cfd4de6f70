"""kernels/gemv.py: the skinny GEMM at decode sizes, its fused epilogues (norm, GLU, residual, RoPE + KV
append, LoRA) and packed weights. Against the torch reference (`_ref`) on fresh random inputs of several
shapes, odd sizes included (tests/kernel_cases.py: the interpreter on the CPU, compiled kernels on a GPU)."""

import pytest
import torch

from edgellm.kernels import gemv, glu, lora, rms_norm, rope
from edgellm.kernels.dispatch import run_with

from kernel_cases import DEVICE, DTYPES, TOL, randn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,bias", [(1, 40, 96, False), (3, 33, 70, True), (16, 64, 256, False)])
def test_gemv(dtype, m, n, k, bias):

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
    expected_glu = glu.glu_ref(gemv.gemv_ref(normed, w))
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
    # Each program stores its part (no atomics: the same sum whatever order they ran in).
    parts = gemv.sumsq_parts(w2, m)
    sums = torch.zeros(parts + 1, m, dtype=torch.float32, device=DEVICE)
    out = gemv.gemv(x, w2, bias, residual=residual, sumsq_out=sums)
    assert torch.count_nonzero(sums[:parts].sum(-1)) == parts and not sums[parts].any()
    torch.testing.assert_close(sums.sum(0), out.float().square().sum(-1), rtol=1e-4, atol=1e-4)
    ref_sums = torch.zeros_like(sums)
    gemv.gemv_ref(x, w2, bias, residual=residual, sumsq_out=ref_sums)
    torch.testing.assert_close(sums.sum(0), ref_sums[0], rtol=5e-2, atol=1e-1)
    in_parts = torch.stack([x[:, :k // 2].float().square().sum(-1), x[:, k // 2:].float().square().sum(-1)])
    torch.testing.assert_close(gemv.gemv(x, w, norm=(nw, 1e-5), norm_sumsq=in_parts, glu="silu", row_fma=False),
                               expected_glu, **tol)
    if quant == "int4" and dtype == torch.float16:  # (the words path: x and the norm weight read as 32-bit pairs)
        with run_with(int4_codes="words"):
            torch.testing.assert_close(gemv.gemv(x, w, norm=(nw, 1e-5), glu="silu", row_fma=False), expected_glu, **tol)
            torch.testing.assert_close(gemv.gemv(x, w, norm=(nw, 1e-5), norm_sumsq=in_parts, glu="silu", row_fma=False),
                                       expected_glu, **tol)
            shifted = torch.cat([x[:, :1], x], dim=1)[:, 1:]  # (rows an odd number of halves apart: not pairs)
            assert not gemv._pairs_aligned(shifted, None)
            torch.testing.assert_close(gemv.gemv(shifted, w2, bias, residual=residual, row_fma=False), expected_res,
                                       **tol)
    with pytest.raises(ValueError, match="norm_sumsq"):
        gemv.gemv(x, w2, norm_sumsq=sums)
    with pytest.raises(ValueError, match="sumsq_out"):
        gemv.gemv(x, w2, sumsq_out=sums.double())
    with pytest.raises(ValueError, match="a part for each"):
        gemv.gemv(x, w2, sumsq_out=sums[:parts - 1])
    gelu = gemv.gemv(x[None], w, glu="gelu_tanh")
    torch.testing.assert_close(gelu, glu.glu_ref(gemv.gemv_ref(x[None], w), activation="gelu_tanh"), **tol)
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


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,bias", [(1, 40, 576, False), (5, 33, 192, True)])
def test_gemv_over_packed_weights(kind, dtype, m, n, k, bias):
    """The dequantizing GEMV against the reference (linear over the dequantized weight); K = 576 has a
    ragged last int4 group (4 x 128 + 64), K = 192 a group of 128 then one of 64."""
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
    if kind == "int4" and dtype == torch.float16:  # (Switches.int4_codes: the same exact codes, the same bits;
        first_words = {}
        for codes in ("f16", "ptx"):  # ptx: its own PTX in a compiled kernel, the f16 ops in the interpreter)
            for operands in ("rows", "weights"):
                with run_with(int4_codes=codes, packed_operands=operands):
                    halves = gemv.gemv(x, qw, b, row_fma=False)
                with run_with(packed_operands=operands):
                    assert torch.equal(halves, gemv.gemv(x, qw, b, row_fma=False)), (codes, operands)
                with run_with(int4_codes=codes.replace("f16", "words").replace("ptx", "words-ptx"),
                              packed_operands=operands):  # (the bytes as 16-bit words: four dots, other sums)
                    words = gemv.gemv(x, qw, b, row_fma=False)
                torch.testing.assert_close(words, ref, **tol)
                assert torch.equal(words, first_words.setdefault(operands, words)), (codes, operands)
        if m == 1:  # (one row on the CUDA cores: the PTX halves, made float32, give the same products)
            with run_with(int4_codes="ptx"):
                halves = gemv.gemv(x, qw, b, row_fma=True)
            assert torch.equal(halves, gemv.gemv(x, qw, b, row_fma=True))
    if kind in ("int8", "fp8"):  # (Switches.byte_codes: PTX in a compiled kernel, the same halves, the same bits)
        for operands, row_fma in [("rows", False), ("weights", False)] + [("rows", True)] * (m == 1):
            with run_with(packed_operands=operands):
                bits = gemv.gemv(x, qw, b, row_fma=row_fma)
            with run_with(packed_operands=operands, byte_codes="ptx"):
                assert torch.equal(gemv.gemv(x, qw, b, row_fma=row_fma), bits), (operands, row_fma)
    with run_with(packed_operands="weights"):  # (Switches.packed_operands: W x^T, the weights first; 64-row tiles)
        torch.testing.assert_close(gemv.gemv(x, qw, b, row_fma=False), ref, **tol)
        torch.testing.assert_close(gemv.gemv(x, qw, b, tile=(64, 64, 4, 2), row_fma=False), ref, **tol)
    # the prefill path's one-pass unpacking
    from edgellm.kernels import dequantize as dequantize_kernel
    assert torch.equal(dequantize_kernel.dequantize(qw, dtype), dequantize_kernel.dequantize_ref(qw, dtype))
    # and the quantization is close to the weight it packs (round to nearest)
    error = (dequantize(qw, torch.float32) - w).norm() / w.norm()
    assert error < {"int8": 0.01, "fp8": 0.04, "int4": 0.12}[kind]


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("m", [40, 64])
def test_packed_weights_take_up_to_64_rows_a_program(kind, m):
    """Packed weights stay in the GEMV up to gemv.PACKED_MAX_ROWS rows, in one block of up to 64 rows a
    program (not dequantized whole for cuBLAS): plain, with the residual and sums of squares the decode
    chain asks for, and with the LoRA epilogue, against the references (K = 576: a ragged int4 group)."""
    from edgellm.quant import quantize

    dtype = torch.float16
    k, n = 576, 72
    assert gemv._row_block(m, False) == 64 and gemv.PACKED_MAX_ROWS >= m
    x, qw = randn(m, k, dtype=dtype), quantize(randn(n, k, seed=1) / k ** 0.5, kind, dtype=dtype)
    residual = randn(m, n, dtype=dtype, seed=2)
    tol = dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(gemv.gemv(x, qw), gemv.gemv_ref(x, qw), **tol)
    sums = torch.zeros(gemv.sumsq_parts(qw, m), m, dtype=torch.float32, device=DEVICE)
    out = gemv.gemv(x, qw, residual=residual, sumsq_out=sums)
    torch.testing.assert_close(out, gemv.gemv_ref(x, qw) + residual, **tol)
    torch.testing.assert_close(sums.sum(0), out.float().square().sum(-1), rtol=1e-3, atol=1e-3)
    segments, rank = (40, 16, 16), 8
    slots = [(3, -1, 0, 1)[i % 4] for i in range(m)]
    used = lora.used_slots(slots, 4, DEVICE)
    index = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    a_stack, b_stack = randn(4, 3 * rank, k, dtype=dtype, seed=3) * 0.05, randn(4, n, rank, dtype=dtype, seed=4) * 0.2
    spec = (lora.lora_shrink(x, a_stack, index, used), b_stack, index, used, torch.tensor([1.0, 0.5, 0.0, 2.0],
                                                                                           device=DEVICE), segments)
    torch.testing.assert_close(gemv.gemv(x, qw, lora=spec), gemv.gemv_ref(x, qw, lora=spec), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slots", [
    [3, -1, 0, 3, 1],  # three adapters and none: the first (prefetched) adapter and the looped ones
    [3],               # batch 1: all of the epilogue prefetched before the K loop
    [-1, -1],          # no adapter: the plain GEMV
    [-1],              # batch 1 with no adapter
])
def test_gemv_with_lora_epilogue(dtype, slots):
    """At decode sizes the LoRA expand is the GEMV's epilogue: the same as gemv + lora_expand."""

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


@pytest.mark.parametrize("invariant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_takes_more_than_16_rows(dtype, invariant):
    """Past 16 rows each block of rows goes to programs of its own (one block of 32 here; batch-invariant,
    blocks of 16): the LoRA epilogue (adapters by row) and RoPE + the KV append agree with the references."""
    with run_with(batch_invariant=invariant):
        _more_than_16_rows(dtype)


def _more_than_16_rows(dtype):
    m, k, segments, rank = 20, 96, (40, 12, 12), 16
    n = sum(segments)
    x, w = randn(m, k, dtype=dtype), randn(n, k, dtype=dtype, seed=1) * 0.2
    a_stack = randn(4, 3 * rank, k, dtype=dtype, seed=3) * 0.2
    b_stack = randn(4, n, rank, dtype=dtype, seed=4) * 0.2
    slots = [(3, -1, 0, 1)[i % 4] for i in range(m)]
    used = lora.used_slots(slots, 4, DEVICE)
    index = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    spec = (lora.lora_shrink(x, a_stack, index, used), b_stack, index, used, torch.tensor([1.0, 0.5, 0.0, 2.0],
                                                                                           device=DEVICE), segments)
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(gemv.gemv(x, w, lora=spec), gemv.gemv_ref(x, w, lora=spec), **tol)
    # RoPE + the KV append over 9 rows of 2 tokens: slots 0..8, each row after a prefix of its own length.
    batch, seq, hq, hkv, head_dim, capacity = 9, 2, 4, 2, 16, 16
    xr, nw = randn(batch, seq, 40, dtype=dtype, seed=8), 1 + 0.1 * randn(40, dtype=dtype, seed=5)
    wr = (randn((hq + 2 * hkv) * head_dim, 40, seed=1) / 40 ** 0.5).to(dtype)
    cos, sin = rope.rope_cos_sin_cache_ref(rope.rope_inv_freq(head_dim, 10000.0).to(DEVICE), capacity)
    caches = [randn(batch + 1, hkv, capacity, head_dim, dtype=dtype, seed=s) for s in (6, 7)]
    mine, ref = [c.clone() for c in caches], [c.clone() for c in caches]
    rope_spec = gemv.RopeAppend(cos, sin, *mine, torch.arange(batch, dtype=torch.int32, device=DEVICE),
                                torch.arange(batch, dtype=torch.int32, device=DEVICE),
                                torch.full((batch,), seq, dtype=torch.int32, device=DEVICE), hq)
    q = gemv.gemv(xr, wr, norm=(nw, 1e-5), rope_append=rope_spec)
    q_ref = gemv.gemv_ref(xr, wr, norm=(nw, 1e-5), rope_append=rope_spec._replace(k_cache=ref[0], v_cache=ref[1]))
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(mine[0], ref[0], **tol)
    torch.testing.assert_close(mine[1], ref[1], **tol)
