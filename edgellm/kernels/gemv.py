"""Skinny GEMM (GEMV at batch 1): y = x @ W^T for a few rows of x, the decode-time matmul.

At decode, a linear layer reads its whole weight matrix for one or a few tokens: the time is the
weight bytes over the bandwidth reached. cuBLAS leaves part of that bandwidth unused at small batch
(DESIGN.md: 1.6 of 2.97 TB/s on an 8192x2048 fp16 GEMV), so this kernel streams W with many loads in
flight: each program owns BLOCK_N output features and walks K in BLOCK_K steps, multiplying the
(padded to 16) rows of x on the tensor cores.
"""

import os

import torch

from ._triton import dot_precision, gdc_launch_dependents, gdc_wait, pow2, prefetch_l2, tl, triton, use_pdl

MAX_ROWS = 16  # rows of x one launch handles (padded to 16 for tl.dot)
# (BLOCK_N, BLOCK_K, num_warps, num_stages): chosen from the H100 sweep in bench/RESULTS.md
DEFAULT_TILE = (32, 256, 4, 4)


@triton.jit
def wait_after_weight_prefetch(w_ptr, rows_n, n, k, s_wn, PREFETCH_LINES: tl.constexpr, LINE: tl.constexpr):
    """PDL prologue of a GEMV program: let the next kernel be scheduled, start pulling the first
    PREFETCH_LINES 128-byte lines (LINE elements each) of each of this program's weight rows into L2
    (weights are never written, so this may overlap the previous kernel), then wait for it."""
    gdc_launch_dependents()
    if PREFETCH_LINES > 0:
        lines = tl.arange(0, PREFETCH_LINES) * LINE
        rows = tl.minimum(rows_n, n - 1).to(tl.int64)
        prefetch_l2(w_ptr + rows[:, None] * s_wn + tl.minimum(lines, k - 1)[None, :])
    gdc_wait()


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, m, n, k, s_xm, s_wn, s_ym,
                 HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NUM_STAGES: tl.constexpr, PDL: tl.constexpr, PREFETCH_LINES: tl.constexpr, LINE: tl.constexpr):
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if PDL == 1:
        wait_after_weight_prefetch(w_ptr, rows_n, n, k, s_wn, PREFETCH_LINES, LINE)
    if PDL == 2:
        gdc_wait()
    rows_m = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    n_ok = rows_n < n
    m_ok = rows_m < m
    w_base = w_ptr + rows_n.to(tl.int64)[:, None] * s_wn
    x_base = x_ptr + rows_m[:, None] * s_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, k, BLOCK_K, num_stages=NUM_STAGES):
        kk = k0 + cols
        k_ok = kk < k
        w = tl.load(w_base + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_base + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if PDL == 2:
        gdc_launch_dependents()
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rows_m[:, None] * s_ym + rows_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def prefetch_lines(k: int, element_size: int, cap: int | None = None) -> int:
    """How many 128-byte lines of each weight row the PDL prologue prefetches (a power of two):
    the whole row, or at most `cap` (EDGELLM_PREFETCH_LINES, default 16 = 2 KB of fp16)."""
    import os

    cap = cap if cap is not None else int(os.environ.get("EDGELLM_PREFETCH_LINES", "16"))
    return 0 if cap <= 0 else min(pow2(-(-k * element_size // 128)), pow2(cap))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, tile=None) -> torch.Tensor:
    """x: [..., K] with at most MAX_ROWS rows in all; weight: [N, K]; bias: [N] or None -> [..., N]."""
    *lead, k = x.shape
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > MAX_ROWS or weight.shape[1] != k or weight.stride(-1) != 1:
        raise ValueError(f"gemv: x {tuple(x.shape)} (at most {MAX_ROWS} rows) does not fit weight {tuple(weight.shape)}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    block_n, block_k, warps, stages = tile or (tuple(int(v) for v in os.environ['EDGELLM_GEMV_TILE'].split(',')) if 'EDGELLM_GEMV_TILE' in os.environ else DEFAULT_TILE)
    block_k = min(block_k, pow2(k, 16))
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    pdl = use_pdl(x)
    mode = int(os.environ.get("EDGELLM_PDL_MODE", "1")) if pdl else 0
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x2, weight, bias if bias is not None else weight, y, m, n, k, x2.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype), BLOCK_M=16, BLOCK_N=block_n,
        BLOCK_K=block_k, NUM_STAGES=stages, PDL=mode, PREFETCH_LINES=prefetch_lines(k, weight.element_size()) if pdl else 0,
        LINE=128 // weight.element_size(),
        num_warps=warps, launch_pdl=pdl)
    return y.reshape(*lead, n)


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, tile=None) -> torch.Tensor:
    """x @ weight^T (+ bias) in x's dtype: torch's linear (cuBLAS on the GPU)."""
    return torch.nn.functional.linear(x, weight, bias)
