"""Block-diagonal (non-causal) attention over variable-length segments of one packed sequence:
the vision encoders' attention. Several images (or, in Qwen2.5-VL's windowed layers, the windows of
each image) are packed into one [N, heads, head_dim] sequence; token i attends to the keys of its
own segment only, bounds[0, i] <= j < bounds[1, i], with no causal limit.

Kernel: flash attention, one program per (block of BLOCK_M queries, head). A block may straddle
segments: it loops over the key range that the union of its rows' segments covers and masks each
row to its own segment (blocks are chosen no longer than the longest segment, so the waste stays
below one block). Online softmax in float32; head_dim that is not a power of two (Qwen's ViT has
80) is padded with masks. `segment_bounds` turns cumulative segment lengths into the per-token
bounds, once per image set.
"""

import torch

from ._triton import dot_precision, pow2, tl, triton
from .attention import online_softmax_start, online_softmax_step

_LOG2E = 1.4426950408889634


@triton.jit
def _segment_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, bounds_ptr, n_tokens, s_qn, s_qh, s_kn, s_kh, s_vn,
                              s_vh, s_on, s_oh, scale_log2, head_dim,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              PRECISION: tl.constexpr):
    m_block = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_tokens
    lo_row = tl.load(bounds_ptr + rows, mask=row_ok, other=n_tokens)
    hi_row = tl.load(bounds_ptr + n_tokens + rows, mask=row_ok, other=0)
    lo = tl.min(lo_row, axis=0)
    hi = tl.max(hi_row, axis=0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    r64 = rows.to(tl.int64)
    q = tl.load(q_ptr + r64[:, None] * s_qn + h * s_qh + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    acc, m_i, l_i = online_softmax_start(BLOCK_M, BLOCK_D)
    for n0 in range(lo, hi, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        k64 = keys.to(tl.int64)
        k = tl.load(k_ptr + k64[None, :] * s_kn + h * s_kh + d[:, None], mask=key_ok[None, :] & d_ok[:, None],
                    other=0.0)
        qk = tl.dot(q, k, input_precision=PRECISION) * scale_log2
        allowed = (keys[None, :] >= lo_row[:, None]) & (keys[None, :] < hi_row[:, None])
        qk = tl.where(allowed, qk, float("-inf"))  # (a row may see no key of this block yet)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, qk, v_ptr + k64[:, None] * s_vn + h * s_vh + d[None, :],
                                            key_ok[:, None] & d_ok[None, :], PRECISION, True)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + r64[:, None] * s_on + h * s_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def segment_bounds(cu_seqlens, device=None) -> tuple[torch.Tensor, int]:
    """Cumulative segment lengths [0, n0, n0 + n1, ...] (host ints or tensor) -> (bounds [2, N] int32:
    each token's segment start and end, on `device`; the longest segment's length)."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64).cpu()
    lengths = cu[1:] - cu[:-1]
    if (lengths < 0).any():
        raise ValueError("segment_bounds: cumulative lengths must not decrease")
    bounds = torch.stack([cu[:-1].repeat_interleave(lengths), cu[1:].repeat_interleave(lengths)])
    return bounds.to(torch.int32).to(device), int(lengths.max()) if lengths.numel() else 0


def _check(q, k, v, bounds):
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError("segment_attention: q, k and v must all be [N, heads, head_dim]")
    if bounds.shape != (2, q.shape[0]):
        raise ValueError(f"segment_attention: bounds must be [2, {q.shape[0]}]")


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, scale: float,
                      longest: int | None = None, *, tile: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """q, k, v: [N, heads, head_dim] (any strides, last dim contiguous); bounds: [2, N] int32
    (segment_bounds). longest: the longest segment (sizes the query blocks; default N).
    tile = (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the default tiling (benchmarks)."""
    _check(q, k, v, bounds)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    n, heads, head_dim = q.shape
    out = torch.empty(n, heads, head_dim, dtype=q.dtype, device=q.device)
    block_d = pow2(head_dim, 16)
    if tile is None:
        tile = (64, 64, 4, 2) if block_d <= 64 else (64, 32, 4, 2)
    block_m, block_n, warps, stages = tile
    block_m = min(block_m, pow2(longest or n, 16))
    grid = (triton.cdiv(n, block_m), heads)
    _segment_attention_kernel[grid](q, k, v, out, bounds.contiguous(), n, q.stride(0), q.stride(1), k.stride(0),
                                    k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
                                    scale * _LOG2E, head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                                    PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=stages)
    return out


def segment_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, scale: float,
                          longest: int | None = None, *, tile=None) -> torch.Tensor:
    """softmax(q k^T * scale) v per head, token i seeing keys bounds[0, i] <= j < bounds[1, i]."""
    _check(q, k, v, bounds)
    keys = torch.arange(q.shape[0], device=q.device)
    allowed = (keys[None, :] >= bounds[0].long()[:, None]) & (keys[None, :] < bounds[1].long()[:, None])
    scores = torch.einsum("nhd,mhd->hnm", q.float(), k.float()) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hnm,mhd->nhd", probs, v.float()).to(q.dtype)
