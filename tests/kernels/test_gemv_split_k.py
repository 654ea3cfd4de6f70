"""Split-K in the GEMV (kernels/split_k.py, a tile's fifth entry): against the reference with every
epilogue the decode step fuses, in each weight format and on both cores; the parts added in one order
(the same bits every run, and the counters left at zero for the next launch)."""

import pytest
import torch

from edgellm.kernels import gemv, lora, rope, split_k
from edgellm.kernels.dispatch import run_with

from kernel_cases import DEVICE, randn

TOL = dict(rtol=2e-2, atol=5e-2)


def _weight(n, k, kind, seed=1):
    from edgellm.quant import quantize

    w = randn(n, k, seed=seed) / k ** 0.5
    return w.half() if kind is None else quantize(w, kind, dtype=torch.float16)


@pytest.mark.parametrize("kind", [None, "int8", "int4", "fp8"])
@pytest.mark.parametrize("m,splits", [(1, 3), (5, 2), (20, 5)])
def test_split_k_equals_the_reference_with_each_epilogue(kind, m, splits):
    k, n = 576, 40  # (K = 576: 4.5 tiles of 128, the last split shorter; a ragged int4 group)
    x, nw = randn(m, k, dtype=torch.float16), 1 + 0.1 * randn(k, dtype=torch.float16, seed=5)
    w, w2 = _weight(2 * n, k, kind), _weight(n, k, kind, seed=2)
    residual = randn(m, n, dtype=torch.float16, seed=3)
    tile = (16, 128, 4, 2, splits)
    assert split_k.k_split(k, 128, splits)[0] == splits
    for row_fma in ([False, True] if m == 1 else [False]):
        plain = gemv.gemv(x, w2, tile=tile, row_fma=row_fma)
        torch.testing.assert_close(plain, gemv.gemv_ref(x, w2), **TOL)
        assert torch.equal(plain, gemv.gemv(x, w2, tile=tile, row_fma=row_fma))  # (one order: the same bits)
        torch.testing.assert_close(gemv.gemv(x, w, norm=(nw, 1e-5), glu="silu", tile=tile, row_fma=row_fma),
                                   gemv.gemv_ref(x, w, norm=(nw, 1e-5), glu="silu"), **TOL)
        parts = gemv.sumsq_parts(w2, m, tile=tile)
        sums = torch.zeros(parts, m, dtype=torch.float32, device=DEVICE)
        out = gemv.gemv(x, w2, residual=residual, sumsq_out=sums, tile=tile, row_fma=row_fma)
        torch.testing.assert_close(out, gemv.gemv_ref(x, w2) + residual, **TOL)
        torch.testing.assert_close(sums.sum(0), out.float().square().sum(-1), rtol=1e-3, atol=1e-3)
    if kind == "int4":  # the weights-first dots too
        with run_with(packed_operands="weights"):
            torch.testing.assert_close(gemv.gemv(x, w2, tile=(64, 128, 4, 2, splits), row_fma=False),
                                       gemv.gemv_ref(x, w2), **TOL)
    assert not split_k.counters(x.device).any()  # (each launch left its counters at zero)


def test_split_k_keeps_the_lora_and_rope_epilogues():
    m, k, segments, rank = 3, 256, (40, 12, 12), 16
    n = sum(segments)
    x, w = randn(m, k, dtype=torch.float16), _weight(n, k, "int4")
    slots = [3, -1, 0]
    used = lora.used_slots(slots, 4, DEVICE)
    index = torch.tensor(slots, dtype=torch.int32, device=DEVICE)
    a_stack = randn(4, 3 * rank, k, dtype=torch.float16, seed=3) * 0.05
    b_stack = randn(4, n, rank, dtype=torch.float16, seed=4) * 0.2
    spec = (lora.lora_shrink(x, a_stack, index, used), b_stack, index, used,
            torch.tensor([1.0, 0.5, 0.0, 2.0], device=DEVICE), segments)
    torch.testing.assert_close(gemv.gemv(x, w, lora=spec, tile=(16, 64, 4, 2, 2)), gemv.gemv_ref(x, w, lora=spec),
                               **TOL)

    batch, hq, hkv, head_dim, capacity = 2, 2, 1, 16, 12
    wq = _weight((hq + 2 * hkv) * head_dim, k, None)
    xq = randn(batch, 1, k, dtype=torch.float16, seed=6)
    cos, sin = rope.rope_cos_sin_cache_ref(rope.rope_inv_freq(head_dim, 10000.0).to(DEVICE), capacity)
    caches = [torch.zeros(batch + 1, hkv, capacity, head_dim, dtype=torch.float16, device=DEVICE) for _ in range(4)]
    slots_t = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([3, 7], dtype=torch.int32, device=DEVICE)
    lengths = torch.ones(batch, dtype=torch.int32, device=DEVICE)
    spec = gemv.RopeAppend(cos, sin, caches[0], caches[1], slots_t, starts, lengths, hq)
    q = gemv.gemv(xq, wq, rope_append=spec, tile=(16, 64, 4, 2, 4))
    q_ref = gemv.gemv_ref(xq, wq, rope_append=spec._replace(k_cache=caches[2], v_cache=caches[3]))
    torch.testing.assert_close(q, q_ref, **TOL)
    torch.testing.assert_close(caches[0], caches[2], **TOL)
    torch.testing.assert_close(caches[1], caches[3], **TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (marker gpu)")
@pytest.mark.parametrize("kind,codes", [("int4", "f32"), ("int4", "ptx"), ("int4", "words-ptx"), ("int8", "ptx"),
                                        (None, "f32")])
def test_split_k_on_the_gpu_adds_in_one_order_at_full_size(kind, codes):
    """Compiled, at a layer's size, many programs racing to count in: every run the same bits, graph
    replays too, close to the reference; the counters back at zero (their ordering is the GPU's to get
    right: the interpreter runs programs one after another)."""
    k, n, m = 4096, 4096, 16
    x, w = randn(m, k, dtype=torch.float16), _weight(n, k, kind)
    settings = dict(packed_operands="weights") if kind else {}
    settings.update({"int4_codes" if kind == "int4" else "byte_codes": codes} if kind else {})
    tile = (128, 128, 4, 3, 8) if kind else (16, 256, 2, 5, 4)
    with run_with(**settings):
        first = gemv.gemv(x, w, tile=tile)
        torch.testing.assert_close(first, gemv.gemv_ref(x, w), **TOL)
        for _ in range(20):
            assert torch.equal(gemv.gemv(x, w, tile=tile), first)
        graph, out = torch.cuda.CUDAGraph(), None
        with torch.cuda.graph(graph):
            out = gemv.gemv(x, w, tile=tile)
        for _ in range(20):
            graph.replay()
            assert torch.equal(out, first)
    assert not split_k.counters(x.device).any()


@pytest.mark.parametrize("m", [1, 5])
def test_the_engine_switches_pick_tile_split_and_cores(m):
    """RunSettings.int4_tile / gemv_split="auto" / packed_row_dots (the decode A/Bs of Switches): the
    GEMV takes the tile, splits K by the matrix alone (auto_splits: the same for any batch) and puts one
    row on the tensor cores; the result as the reference's, the sums of squares' parts as many as asked."""
    k, n = 576, 40
    x, w = randn(m, k, dtype=torch.float16), _weight(n, k, "int4")
    residual = randn(m, n, dtype=torch.float16, seed=3)
    with run_with(int4_tile=(16, 64, 4, 2), gemv_split="auto", packed_row_dots=True):
        assert not gemv._row_fma(1, w) and gemv._row_fma(1, None)
        assert split_k.auto_splits(3, k, 64, split_k.sm_count(x.device)) == 9  # (3 programs of 16 rows)
        sums = torch.zeros(gemv.sumsq_parts(w, m), m, dtype=torch.float32, device=DEVICE)
        out = gemv.gemv(x, w, residual=residual, sumsq_out=sums)
    torch.testing.assert_close(out, gemv.gemv_ref(x, w) + residual, **TOL)
    torch.testing.assert_close(sums.sum(0), out.float().square().sum(-1), rtol=1e-3, atol=1e-3)
