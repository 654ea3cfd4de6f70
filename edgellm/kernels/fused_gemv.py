"""Skinny GEMMs with the preceding elementwise op folded in, for decode steps of a few rows, where
each launch's fixed cost (1-4 us on an H100, bench/RESULTS.md) is worth more than the bytes:

- `add_rms_norm_gemv`: y = rms_norm(x + residual) @ W^T, and the new residual x + residual. The rows
  are short (a hidden state), so every program recomputes their norm instead of waiting for a
  separate norm kernel; program 0 alone writes the new residual.
- `silu_mul_gemv`: y = (silu(gate) * up) @ W^T from the gate/up projection's output.

Same tiles as gemv.py. Rounding follows the unfused ops (normalised rows and silu*up are rounded to
the input dtype before the matmul, as the separate kernels store them).

Status: tested against the references; the model uses them only with EDGELLM_FUSED_GEMV=1 until a
GPU measurement shows the gain (engine/model.py, _fused_decode).
"""

import torch

from ._triton import dot_precision, pow2, tl, triton, use_pdl
from .gemv import DEFAULT_TILE, MAX_ROWS, gemv_ref, prefetch_lines, wait_after_weight_prefetch
from .rms_norm import add_rms_norm_ref
from .silu_mul import silu_mul_ref


@triton.jit
def _fused_gemv_kernel(x_ptr, r_ptr, nw_ptr, w_ptr, y_ptr, r_out_ptr, m, n, k, s_xm, s_rm, s_wn, s_ym, eps,
                       MODE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                       PDL: tl.constexpr, PREFETCH_LINES: tl.constexpr, LINE: tl.constexpr):
    # MODE 1: x (+ residual) -> RMSNorm -> GEMM;  MODE 2: x = [gate | up] -> silu(gate) * up -> GEMM.
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if PDL:
        wait_after_weight_prefetch(w_ptr, rows_n, n, k, s_wn, PREFETCH_LINES, LINE)
    rows_m = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_K)
    n_ok = rows_n < n
    m_ok = rows_m < m
    x_base = x_ptr + rows_m[:, None] * s_xm
    dtype = x_ptr.dtype.element_ty
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if MODE == 1:
        sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            kk = k0 + cols
            mask = m_ok[:, None] & (kk < k)[None, :]
            h = tl.load(x_base + kk[None, :], mask=mask, other=0.0) + \
                tl.load(r_ptr + rows_m[:, None] * s_rm + kk[None, :], mask=mask, other=0.0)
            if tl.program_id(0) == 0:
                tl.store(r_out_ptr + rows_m[:, None] * k + kk[None, :], h, mask=mask)
            h32 = h.to(tl.float32)
            sq += tl.sum(h32 * h32, axis=1)
        rstd = 1.0 / tl.sqrt(sq / k + eps)
    w_base = w_ptr + rows_n.to(tl.int64)[:, None] * s_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, k, BLOCK_K, num_stages=NUM_STAGES):
        kk = k0 + cols
        k_ok = kk < k
        mask = m_ok[:, None] & k_ok[None, :]
        if MODE == 1:
            h = tl.load(x_base + kk[None, :], mask=mask, other=0.0) + \
                tl.load(r_ptr + rows_m[:, None] * s_rm + kk[None, :], mask=mask, other=0.0)
            normed = (h.to(tl.float32) * rstd[:, None]).to(dtype)
            x = normed * tl.load(nw_ptr + kk, mask=k_ok, other=0.0)[None, :]
        else:
            gate = tl.load(x_base + kk[None, :], mask=mask, other=0.0).to(tl.float32)
            up = tl.load(x_base + k + kk[None, :], mask=mask, other=0.0)
            x = (gate / (1.0 + tl.exp(-gate))).to(dtype) * up
        w = tl.load(w_base + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x.to(w.dtype), tl.trans(w), input_precision=PRECISION)
    y = y_ptr + rows_m[:, None] * s_ym + rows_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _launch(mode, x2, residual, norm_w, weight, eps, k, tile):
    m, n = x2.shape[0], weight.shape[0]
    if m > MAX_ROWS or weight.shape[1] != k or weight.stride(-1) != 1:
        raise ValueError(f"fused gemv: {m} rows (at most {MAX_ROWS}) x {k} do not fit weight {tuple(weight.shape)}")
    block_n, block_k, warps, stages = tile or DEFAULT_TILE
    block_k = min(block_k, pow2(k, 16))
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    r_out = torch.empty(m, k, dtype=x2.dtype, device=x2.device) if mode == 1 else y
    r = residual if residual is not None else x2
    pdl = use_pdl(x2)
    _fused_gemv_kernel[(triton.cdiv(n, block_n),)](
        x2, r, norm_w if norm_w is not None else weight, weight, y, r_out, m, n, k, x2.stride(0), r.stride(0),
        weight.stride(0), y.stride(0), eps, MODE=mode, PRECISION=dot_precision(x2.dtype),
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=stages, PDL=pdl,
        PREFETCH_LINES=prefetch_lines(k, weight.element_size()) if pdl else 0, LINE=128 // weight.element_size(),
        num_warps=warps, launch_pdl=pdl)
    return y, r_out


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def add_rms_norm_gemv(x, residual, norm_weight, eps: float, weight, *, tile=None):
    """(rms_norm(x + residual) @ weight^T, x + residual); x, residual: [..., K], weight: [N, K]."""
    *lead, k = x.shape
    y, summed = _launch(1, _rows(x), _rows(residual), norm_weight, weight, eps, k, tile)
    return y.reshape(*lead, weight.shape[0]), summed.reshape(*lead, k)


def silu_mul_gemv(gate_up, weight, *, tile=None):
    """(silu(gate) * up) @ weight^T; gate_up: [..., 2K] (gate then up), weight: [N, K]."""
    *lead, k2 = gate_up.shape
    y, _ = _launch(2, _rows(gate_up), None, None, weight, 0.0, k2 // 2, tile)
    return y.reshape(*lead, weight.shape[0])


def add_rms_norm_gemv_ref(x, residual, norm_weight, eps: float, weight, *, tile=None):
    normed, summed = add_rms_norm_ref(x, residual, norm_weight, eps)
    return gemv_ref(normed, weight), summed


def silu_mul_gemv_ref(gate_up, weight, *, tile=None):
    return gemv_ref(silu_mul_ref(gate_up), weight)
