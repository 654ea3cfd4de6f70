"""A packed weight (edgellm/quant/formats.py) unpacked to the compute dtype in one pass: what prefill
multiplies by with cuBLAS (many tokens share the one dequantization; decode reads packed tiles in the
GEMV instead). Kernel: one program per [BLOCK_N, BLOCK_K] tile, reads the codes and their scales
(and zeros), writes the tile."""

import torch

from ._triton import tl, triton
from .gemv import QUANT_CODES, _weight_tile

BLOCK_N, BLOCK_K = 32, 128


@triton.jit
def _dequantize_kernel(w_ptr, sc_ptr, zp_ptr, out_ptr, n, k, s_wn, s_sn, group,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QUANT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rows < n
    w_base = w_ptr + rows.to(tl.int64)[:, None] * s_wn
    out_base = out_ptr + rows.to(tl.int64)[:, None] * k
    dtype = out_ptr.dtype.element_ty
    if QUANT == 2:  # int4: byte j holds columns 2j (low nibble) and 2j + 1, which share a group
        j = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        kk = 2 * j
        ok = n_ok[:, None] & (kk < k)[None, :]
        packed = tl.load(w_base + j[None, :], mask=ok, other=0)
        at = rows[:, None] * s_sn + (kk // group)[None, :]
        s = tl.load(sc_ptr + at, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(zp_ptr + at, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_base + kk[None, :], (((packed & 0xF).to(tl.float32) - z) * s).to(dtype), mask=ok)
        tl.store(out_base + kk[None, :] + 1, (((packed >> 4).to(tl.float32) - z) * s).to(dtype),
                 mask=n_ok[:, None] & (kk + 1 < k)[None, :])
    else:  # int8 / fp8: codes (less the row's zero, int8) times the row's scale
        kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        codes = _weight_tile(w_base, kk, k, n_ok, tl.float32, QUANT)
        if QUANT == 1:
            codes = codes - tl.load(zp_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        s = tl.load(sc_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_base + kk[None, :], (codes * s[:, None]).to(dtype), mask=n_ok[:, None] & (kk < k)[None, :])


def dequantize(qw, dtype: torch.dtype) -> torch.Tensor:
    n, k = qw.shape
    data = qw.data.view(torch.uint8) if qw.kind == "fp8" else qw.data
    out = torch.empty(n, k, dtype=dtype, device=data.device)
    zeros = qw.zeros if qw.zeros is not None else qw.scales
    _dequantize_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))](
        data, qw.scales, zeros, out, n, k, data.stride(0), qw.scales.stride(0) if qw.scales.dim() == 2 else 1,
        qw.group or 1, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, QUANT=QUANT_CODES[qw.kind], num_warps=4)
    return out


def dequantize_ref(qw, dtype: torch.dtype) -> torch.Tensor:
    from ..quant.formats import dequantize as unpack

    return unpack(qw, dtype)
