"""LoRA for a batch whose tokens use different adapters (or none): y += scale[a] * (x @ A[a]^T) @ B[a]^T
with a = index[token], gathered from stacks that hold every loaded adapter.

One projection group at a time: a fused weight (qkv, gate_up) has G segments (q, k, v / gate, up),
each with its own A (R rows) and B. So A stacks are [adapters, G*R, K] (segment g in rows g*R..) and
B stacks [adapters, N, R] (output features in segment order); ranks below R are zero-padded.

- `lora_shrink`: t = x @ A[a]^T per token, float32, returned as partial sums over K splits,
  [splits, M, G*R] (their sum is the product);
- `lora_expand`: y[m, n] += scale[a_m] * t[m, seg(n)*R : seg(n)*R + R] . B[a_m, n, :], in place.

Kernels. A decode step has a handful of rows, so a tile is BLOCK_M tokens (rows) whatever their
adapters: each program walks the adapter slots and, for each slot some of its tokens use, loads that
adapter's tile once and multiplies it on the tensor cores with the other tokens masked out. A batch
of 16 rows on 4 adapters reads each adapter tile once per program, not once per row. Zero-rank
gating: a slot no token of the tile uses is skipped before any load, and a tile with no adapter at
all loads nothing else. The shrink splits K over programs (one BLOCK_K chunk each), so a
16 x 2048 adapter matrix is read by many SMs at once instead of one; the expand adds the splits up.
"""

import torch

from ._triton import dot_precision, pdl_release, pdl_wait, pow2, tl, triton, use_pdl

BLOCK_M = 16
SHRINK_BLOCK_K = 256


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, idx_ptr, t_ptr, m, k, gr, n_slots, s_xm, s_as, s_ar, s_tsplit, s_tm,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < m
    adapter = tl.load(idx_ptr + rows, mask=row_ok, other=-1)
    if tl.max(adapter, axis=0) >= 0:
        kk = split * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = kk < k
        r_ok = r < gr
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * s_xm + kk[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for slot in range(n_slots):
            hit = adapter == slot
            if tl.max(hit.to(tl.int32), axis=0) > 0:
                a = tl.load(a_ptr + slot * s_as + r[:, None] * s_ar + kk[None, :], mask=r_ok[:, None] & k_ok[None, :],
                            other=0.0)
                acc += tl.where(hit[:, None], tl.dot(x, tl.trans(a), input_precision=PRECISION), 0.0)
        pdl_release(PDL)
        tl.store(t_ptr + split * s_tsplit + rows.to(tl.int64)[:, None] * s_tm + r[None, :], acc,
                 mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_expand_kernel(y_ptr, t_ptr, b_ptr, idx_ptr, scale_ptr, m, n, rank, n_splits, n_slots, end0, end1,
                        s_ym, s_tsplit, s_tm, s_bs, s_bn,
                        GROUPS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < m
    adapter = tl.load(idx_ptr + rows, mask=row_ok, other=-1)
    if tl.max(adapter, axis=0) >= 0:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_R)
        n_ok = cols < n
        r_ok = r < rank
        # Segment of each output feature: 0 below end0, 1 below end1, else 2.
        segment = (cols >= end0).to(tl.int32) + (cols >= end1).to(tl.int32)
        dtype = b_ptr.dtype.element_ty
        delta = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in tl.static_range(GROUPS):
            t_tile = t_ptr + rows.to(tl.int64)[:, None] * s_tm + g * rank + r[None, :]
            t_mask = row_ok[:, None] & r_ok[None, :]
            t = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for split in range(n_splits):
                t += tl.load(t_tile + split * s_tsplit, mask=t_mask, other=0.0)
            t = t.to(dtype)  # rounded to the model dtype, as the unfused lora_A output would be
            w_mask = (n_ok & (segment == g))[:, None] & r_ok[None, :]
            for slot in range(n_slots):
                hit = adapter == slot
                if tl.max(hit.to(tl.int32), axis=0) > 0:
                    w = tl.load(b_ptr + slot * s_bs + cols[:, None] * s_bn + r[None, :], mask=w_mask, other=0.0)
                    part = tl.dot(t, tl.trans(w), input_precision=PRECISION) * tl.load(scale_ptr + slot)
                    delta += tl.where(hit[:, None], part, 0.0)
        y_tile = y_ptr + rows.to(tl.int64)[:, None] * s_ym + cols[None, :]
        mask = (row_ok & (adapter >= 0))[:, None] & n_ok[None, :]
        y = tl.load(y_tile, mask=mask, other=0.0).to(tl.float32) + delta
        pdl_release(PDL)
        tl.store(y_tile, y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor, index: torch.Tensor, what: str) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if index.shape != (x2.shape[0],):
        raise ValueError(f"{what}: index {tuple(index.shape)} needs one entry per token of {tuple(x.shape)}")
    return x2


def lora_shrink(x: torch.Tensor, a_stack: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [..., K] (M tokens); a_stack: [adapters, G*R, K]; index: [M] int32 (-1: no adapter) ->
    [splits, M, G*R] float32 partial sums (rows without an adapter may be left unwritten)."""
    x2 = _rows(x, index, "lora_shrink")
    m, k = x2.shape
    slots, gr = a_stack.shape[:2]
    if a_stack.shape[2] != k or a_stack.stride(-1) != 1:
        raise ValueError(f"lora_shrink: A stack {tuple(a_stack.shape)} does not fit x {tuple(x.shape)}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    block_k = min(SHRINK_BLOCK_K, pow2(k, 16))
    splits = triton.cdiv(k, block_k)
    t = torch.empty(splits, m, gr, dtype=torch.float32, device=x.device)
    block_r = min(32, pow2(gr, 16))
    pdl = use_pdl(x)
    _lora_shrink_kernel[(triton.cdiv(m, BLOCK_M), splits, triton.cdiv(gr, block_r))](
        x2, a_stack, index, t, m, k, gr, slots, x2.stride(0), a_stack.stride(0), a_stack.stride(1), t.stride(0),
        t.stride(1), PRECISION=dot_precision(x.dtype), BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=block_k,
        PDL=pdl, num_warps=4, launch_pdl=pdl)
    return t


def _segment_ends(segments) -> tuple[int, int]:
    if not 1 <= len(segments) <= 3:
        raise ValueError(f"lora: 1 to 3 segments per projection group, got {len(segments)}")
    ends = [sum(segments[:i + 1]) for i in range(len(segments))]
    return tuple((ends[:-1] + [ends[-1]] * 2)[:2])


def lora_expand(y: torch.Tensor, t: torch.Tensor, b_stack: torch.Tensor, index: torch.Tensor,
                scale: torch.Tensor, segments) -> torch.Tensor:
    """y: [..., N] (the base projection of M tokens, updated in place and returned); t: lora_shrink's
    [splits, M, G*R]; b_stack: [adapters, N, R]; scale: [adapters] float32; segments: the G output
    sizes, summing to N."""
    y2 = _rows(y, index, "lora_expand")
    m, n = y2.shape
    slots, _, rank = b_stack.shape
    if b_stack.shape[1] != n or sum(segments) != n or t.dim() != 3 or t.shape[1:] != (m, len(segments) * rank):
        raise ValueError(f"lora_expand: y {tuple(y.shape)}, t {tuple(t.shape)}, B stack {tuple(b_stack.shape)} "
                         f"and segments {tuple(segments)} do not agree")
    if not y.is_contiguous() or b_stack.stride(-1) != 1 or t.stride(-1) != 1:
        raise ValueError("lora_expand: y (updated in place) must be contiguous, t and the B stack need a "
                         "contiguous last dim")
    end0, end1 = _segment_ends(list(segments))
    pdl = use_pdl(y)
    block_n = 64
    _lora_expand_kernel[(triton.cdiv(m, BLOCK_M), triton.cdiv(n, block_n))](
        y2, t, b_stack, index, scale, m, n, rank, t.shape[0], slots, end0, end1, y2.stride(0), t.stride(0),
        t.stride(1), b_stack.stride(0), b_stack.stride(1), GROUPS=len(segments),
        PRECISION=dot_precision(b_stack.dtype), BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=pow2(rank, 16),
        PDL=pdl, num_warps=4, launch_pdl=pdl)
    return y


def lora_shrink_ref(x: torch.Tensor, a_stack: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per token m with index[m] >= 0: x[m] @ a_stack[index[m]]^T in float32, as one split [1, M, G*R];
    tokens without an adapter give zeros."""
    x2 = _rows(x, index, "lora_shrink_ref").float()
    a = a_stack[index.long().clamp(min=0)].float()  # [M, G*R, K]
    t = torch.einsum("mk,mrk->mr", x2, a)
    return (t * (index >= 0).to(t.dtype)[:, None])[None]


def lora_expand_ref(y: torch.Tensor, t: torch.Tensor, b_stack: torch.Tensor, index: torch.Tensor,
                    scale: torch.Tensor, segments) -> torch.Tensor:
    """y + scale[a] * (t summed over splits, segment g, rounded to the model dtype) @ B[a][segment g]^T
    for each segment; tokens with index < 0 unchanged. Returns a new tensor shaped like y."""
    y2 = _rows(y, index, "lora_expand_ref")
    rank = b_stack.shape[2]
    has = index >= 0
    a = index.long().clamp(min=0)
    b = b_stack[a].float()  # [M, N, R]
    t = t.sum(0).to(b_stack.dtype).float()
    parts, start = [], 0
    for g, size in enumerate(segments):
        parts.append(torch.einsum("mr,mnr->mn", t[:, g * rank:(g + 1) * rank], b[:, start:start + size]))
        start += size
    delta = torch.cat(parts, dim=-1) * scale[a][:, None]
    return torch.where(has[:, None], (y2.float() + delta).to(y.dtype), y2).reshape(y.shape)
