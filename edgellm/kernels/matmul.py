"""Batch-invariant GEMM: y = x @ W^T (+ bias) with one fixed tiling, for prefill under
Switches.batch_invariant (deterministic decoding).

cuBLAS picks its kernel, tile and split-K by the problem's shape, so a token's row comes out with
other roundings when more tokens share the matmul (a prompt batched with others, a prompt prefilled
in other chunks, or after a reused prefix). Here every program computes a BLOCK_M x BLOCK_N tile of
y over the whole K, in BLOCK_K steps from 0, on the tensor cores with a float32 accumulator: a row's
result depends only on its own values and the weight, never on how many rows there are or where it
sits. No split-K (its partial sums would be added in an order set by the shape).

It also reads int4 weights as they are packed (formats.py), unpacking each K tile in registers as the
GEMV does: a prefill over them without writing a dequantized float16 copy of each matrix first (4x the
packed bytes written, then read back by cuBLAS; RunSettings.packed_prefill).
"""

import torch
import torch.nn.functional as F

from ._triton import dot_precision, tl, triton
from .gemv_weights import _int4_dots, codes_mode

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): one tile for every shape (the invariance needs one);
# 128 x 128 x 64 with 8 warps is Triton's usual choice for large fp16 GEMMs on Hopper.
TILE = (128, 128, 64, 8, 3)


@triton.jit
def _matmul_kernel(x_ptr, w_ptr, b_ptr, y_ptr, m, n, k, s_xm, s_wn, s_ym, sc_ptr, zp_ptr, s_sn, group: tl.constexpr,
                   HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr, INT4: tl.constexpr,
                   CODES: tl.constexpr, EVEN_K: tl.constexpr):
    # Programs walk the tiles in groups of GROUP_M row blocks, so neighbours share weight tiles in L2.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(m, BLOCK_M)
    blocks_n = tl.cdiv(n, BLOCK_N)
    band = pid // (GROUP_M * blocks_n)
    first_m = band * GROUP_M
    size_m = tl.minimum(blocks_m - first_m, GROUP_M)
    block_m = first_m + (pid % (GROUP_M * blocks_n)) % size_m
    block_n = (pid % (GROUP_M * blocks_n)) // size_m
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if INT4:  # (a packed int4 weight, unpacked tile by tile as the GEMV's dots do: no dequantized copy)
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * s_xm
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * s_wn
        acc = _int4_dots(x_rows, x_rows, rows < m, w_rows, w_rows, cols < n, sc_ptr, zp_ptr, cols, s_sn, k, 0, k,
                         group, x_ptr, x_ptr, tl.zeros([BLOCK_M], dtype=tl.float32), BLOCK_M, BLOCK_N, BLOCK_K,
                         NUM_STAGES, PRECISION, 0, CODES, False, EVEN_K)
    else:
        x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * s_xm + kk[None, :]
        w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * s_wn + kk[None, :]
        for k0 in tl.range(0, k, BLOCK_K, num_stages=NUM_STAGES):
            k_ok = (k0 + kk) < k
            x = tl.load(x_ptrs + k0, mask=(rows < m)[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs + k0, mask=(cols < n)[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * s_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows < m)[:, None] & (cols < n)[None, :])


def supports(weight) -> bool:
    """Whether matmul reads this weight as it is: full precision, or int4 in groups of whole K tiles of at
    least 32 columns (other packed formats are dequantized for cuBLAS first)."""
    kind = getattr(weight, "kind", None)
    return kind is None or (kind == "int4" and weight.group % 32 == 0)


def matmul(x: torch.Tensor, weight, bias: torch.Tensor | None = None, *, tile=None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N] in x's dtype; weight a tensor or an int4
    QuantizedWeight (edgellm/quant: unpacked tile by tile, no dequantized copy; codes as
    RunSettings.int4_codes asks, gemv_weights.codes_mode, its bytes path: 128-row tiles); tile=(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) overrides
    TILE (tests: the interpreter's tiles are small)."""
    *lead, k = x.shape
    kind = getattr(weight, "kind", None)
    if (kind is None and weight.dim() != 2) or weight.shape[1] != k:
        raise ValueError(f"matmul: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if not supports(weight):
        raise ValueError(f"matmul: reads full-precision or int4 weights (groups of 32s), not {kind}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"matmul: bias {tuple(bias.shape)} does not fit weight {tuple(weight.shape)}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    data = weight.data if kind else weight
    if data.stride(-1) != 1:
        data = data.contiguous()
    m, n = x2.shape[0], weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k, warps, stages = tile or TILE
    if kind == "int4":
        block_k = min(max(32, block_k), weight.group & -weight.group)  # (a K tile in one group, whole blocks)
    scales = weight.scales if kind else y
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _matmul_kernel[grid](x2, data, bias if bias is not None else y, y, m, n, k, x2.stride(0), data.stride(0),
                         y.stride(0), scales, weight.zeros if kind else y, scales.stride(0) if kind else 0,
                         weight.group if kind else 1, HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype),
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, NUM_STAGES=stages,
                         INT4=kind == "int4", CODES=codes_mode(kind, x.dtype, words=False),
                         EVEN_K=kind == "int4" and k % block_k == 0, num_warps=warps)
    return y.reshape(*lead, n)


def matmul_ref(x: torch.Tensor, weight, bias: torch.Tensor | None = None, *, tile=None) -> torch.Tensor:
    """torch's linear (cuBLAS on the GPU) over the weight (dequantized when packed): the same product,
    rounded as the shape's kernel rounds it."""
    if getattr(weight, "kind", None):
        from ..quant.formats import dequantize

        weight = dequantize(weight, x.dtype)
    return F.linear(x, weight, bias)
