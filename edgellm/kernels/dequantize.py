"""A packed weight (edgellm/quant/formats.py) unpacked to the compute dtype in one pass: what prefill
multiplies by with cuBLAS (many tokens share the one dequantization; decode reads packed tiles in the
GEMV instead). Kernel: one program per [BLOCK_N, BLOCK_K] tile, reads the codes and their scales
(and zeros), writes the tile."""

import torch

from ._triton import tl, triton
from .gemv_weights import QUANT_CODES, _codes_f32, _int4_tile, _weight_tile, _zero_f32

BLOCK_N, BLOCK_K = 32, 256


@triton.jit
def _dequantize_kernel(w_ptr, sc_ptr, zp_ptr, out_ptr, n, k, s_wn, s_sn, group,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QUANT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rows < n
    w_base = w_ptr + rows.to(tl.int64)[:, None] * s_wn
    out_base = out_ptr + rows.to(tl.int64)[:, None] * k
    dtype = out_ptr.dtype.element_ty
    k0 = tl.program_id(1) * BLOCK_K
    if QUANT == 2:  # int4: low and high nibbles to the two halves of each block of 32 columns
        lo, hi, s, z, cols = _int4_tile(w_base, sc_ptr, zp_ptr, rows, n_ok, s_sn, k0 // 2, k, group, BLOCK_K // 32)
        out = out_base[:, :, None] + cols[None]
        s, zm = s[:, :, None], _zero_f32(z)[:, :, None]
        tl.store(out, ((lo - zm) * s).to(dtype), mask=n_ok[:, None, None] & (cols < k)[None])
        tl.store(out + 16, ((hi - zm) * s).to(dtype), mask=n_ok[:, None, None] & (cols + 16 < k)[None])
    else:  # int8 / fp8: codes (less the row's zero, int8) times the row's scale
        kk = k0 + tl.arange(0, BLOCK_K)
        if QUANT == 1:  # (_codes_f32's 2^23 comes off with the zero)
            q = tl.load(w_base + kk[None, :], mask=n_ok[:, None] & (kk < k)[None, :], other=0).to(tl.int32)
            w = _codes_f32(q) - _zero_f32(tl.load(zp_ptr + rows, mask=n_ok, other=0.0))[:, None]
        else:
            w = _weight_tile(w_base, kk, k, n_ok, tl.float32, QUANT)
        w = w * tl.load(sc_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_base + kk[None, :], w.to(dtype), mask=n_ok[:, None] & (kk < k)[None, :])


def dequantize(qw, dtype: torch.dtype) -> torch.Tensor:
    n, k = qw.shape
    if qw.kind == "int4" and qw.group % 32:  # the kernel's blocks of 32 columns would straddle groups
        return dequantize_ref(qw, dtype)
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
