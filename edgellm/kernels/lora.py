"""LoRA for a batch whose rows use different adapters (or none): y += scale[a] * (x @ A[a]^T) @ B[a]^T
with a = index[row], gathered from stacks that hold every loaded adapter.

One projection group at a time: a fused weight (qkv, gate_up) has G segments (q, k, v / gate, up),
each with its own A (R rows) and B. So A stacks are [adapters, G*R, K] (segment g in rows g*R..) and
B stacks [adapters, N, R] (output features in segment order); ranks below R are zero-padded.

- `lora_shrink`: t[b, s, :] = x[b, s, :] @ A[a_b]^T, float32, [B, S, G*R].
- `lora_expand`: y[b, s, n] += scale[a_b] * t[b, s, seg(n)*R : seg(n)*R + R] . B[a_b, n, :], in place.

Kernels: one program per (row, block of BLOCK_M tokens of that row, block of outputs), so every
tile has one adapter and runs on tl.dot. Zero-rank gating: a program whose row has index < 0 returns
before loading anything, so rows without an adapter cost no LoRA math (and no adapter bytes).
"""

import torch

from ._triton import dot_precision, pdl_release, pdl_wait, pow2, tl, triton, use_pdl

BLOCK_M = 16


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, idx_ptr, t_ptr, seq, k, gr, s_xb, s_xs, s_as, s_ar, s_tb, s_ts,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    b = tl.program_id(0)
    adapter = tl.load(idx_ptr + b)
    if adapter >= 0:
        s = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        s_ok = s < seq
        r_ok = r < gr
        x_base = x_ptr + b.to(tl.int64) * s_xb + s[:, None] * s_xs
        a_base = a_ptr + adapter.to(tl.int64) * s_as + r[:, None] * s_ar
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < k
            x = tl.load(x_base + kk[None, :], mask=s_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(a_base + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(a), input_precision=PRECISION)
        pdl_release(PDL)
        tl.store(t_ptr + b.to(tl.int64) * s_tb + s[:, None] * s_ts + r[None, :], acc,
                 mask=s_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_expand_kernel(y_ptr, t_ptr, b_ptr, idx_ptr, scale_ptr, seq, n, rank, end0, end1,
                        s_yb, s_ys, s_tb, s_ts, s_bs, s_bn,
                        GROUPS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    b = tl.program_id(0)
    adapter = tl.load(idx_ptr + b)
    if adapter >= 0:
        s = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_R)
        s_ok = s < seq
        n_ok = cols < n
        r_ok = r < rank
        # Segment of each output feature: 0 below end0, 1 below end1, else 2.
        segment = (cols >= end0).to(tl.int32) + (cols >= end1).to(tl.int32)
        t_base = t_ptr + b.to(tl.int64) * s_tb + s[:, None] * s_ts
        b_tile = b_ptr + adapter.to(tl.int64) * s_bs + cols[:, None] * s_bn + r[None, :]
        delta = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in tl.static_range(GROUPS):
            t = tl.load(t_base + g * rank + r[None, :], mask=s_ok[:, None] & r_ok[None, :], other=0.0)
            w = tl.load(b_tile, mask=(n_ok & (segment == g))[:, None] & r_ok[None, :], other=0.0)
            delta += tl.dot(t, tl.trans(w.to(tl.float32)), input_precision=PRECISION)
        y_tile = y_ptr + b.to(tl.int64) * s_yb + s[:, None] * s_ys + cols[None, :]
        mask = s_ok[:, None] & n_ok[None, :]
        y = tl.load(y_tile, mask=mask, other=0.0).to(tl.float32) + tl.load(scale_ptr + adapter) * delta
        pdl_release(PDL)
        tl.store(y_tile, y.to(y_ptr.dtype.element_ty), mask=mask)


def _check(x, stack, index, what):
    if x.dim() != 3 or stack.dim() != 3 or index.shape != (x.shape[0],):
        raise ValueError(f"{what}: x [B, S, K], a stack [adapters, ., .] and an index [B] are needed")


def lora_shrink(x: torch.Tensor, a_stack: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, S, K]; a_stack: [adapters, G*R, K]; index: [B] int32 (-1: no adapter) -> [B, S, G*R] float32
    (rows without an adapter are left unwritten: lora_expand skips them)."""
    _check(x, a_stack, index, "lora_shrink")
    batch, seq, k = x.shape
    gr = a_stack.shape[1]
    if a_stack.shape[2] != k or a_stack.stride(-1) != 1:
        raise ValueError(f"lora_shrink: A stack {tuple(a_stack.shape)} does not fit x {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    t = torch.empty(batch, seq, gr, dtype=torch.float32, device=x.device)
    block_r = min(64, pow2(gr, 16))
    pdl = use_pdl(x)
    _lora_shrink_kernel[(batch, triton.cdiv(seq, BLOCK_M), triton.cdiv(gr, block_r))](
        x, a_stack, index, t, seq, k, gr, x.stride(0), x.stride(1), a_stack.stride(0), a_stack.stride(1),
        t.stride(0), t.stride(1), PRECISION=dot_precision(x.dtype), BLOCK_M=BLOCK_M, BLOCK_R=block_r,
        BLOCK_K=min(256, pow2(k, 16)), PDL=pdl, num_warps=4, launch_pdl=pdl)
    return t


def _segment_ends(segments) -> tuple[int, int]:
    ends = [sum(segments[:i + 1]) for i in range(len(segments))]
    if not 1 <= len(segments) <= 3:
        raise ValueError(f"lora: 1 to 3 segments per projection group, got {len(segments)}")
    return tuple((ends[:-1] + [ends[-1]] * 2)[:2])


def lora_expand(y: torch.Tensor, t: torch.Tensor, b_stack: torch.Tensor, index: torch.Tensor,
                scale: torch.Tensor, segments) -> torch.Tensor:
    """y: [B, S, N] (the base projection, updated in place and returned); t: lora_shrink's output;
    b_stack: [adapters, N, R]; scale: [adapters] float32; segments: the G output sizes summing to N."""
    _check(y, b_stack, index, "lora_expand")
    batch, seq, n = y.shape
    rank = b_stack.shape[2]
    if b_stack.shape[1] != n or sum(segments) != n or t.shape != (batch, seq, len(segments) * rank):
        raise ValueError(f"lora_expand: y {tuple(y.shape)}, t {tuple(t.shape)}, B stack {tuple(b_stack.shape)} "
                         f"and segments {tuple(segments)} do not agree")
    if y.stride(-1) != 1 or b_stack.stride(-1) != 1 or t.stride(-1) != 1:
        raise ValueError("lora_expand: y, t and the B stack need a contiguous last dim")
    end0, end1 = _segment_ends(list(segments))
    pdl = use_pdl(y)
    block_n = 64
    _lora_expand_kernel[(batch, triton.cdiv(seq, BLOCK_M), triton.cdiv(n, block_n))](
        y, t, b_stack, index, scale, seq, n, rank, end0, end1, y.stride(0), y.stride(1), t.stride(0), t.stride(1),
        b_stack.stride(0), b_stack.stride(1), GROUPS=len(segments), PRECISION=dot_precision(torch.float32),
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=pow2(rank, 16), PDL=pdl, num_warps=4, launch_pdl=pdl)
    return y


def lora_shrink_ref(x: torch.Tensor, a_stack: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per row b with index[b] >= 0: x[b] @ a_stack[index[b]]^T in float32; other rows zero."""
    a = a_stack[index.long().clamp(min=0)].float()  # [B, G*R, K]
    t = torch.einsum("bsk,brk->bsr", x.float(), a)
    return t * (index >= 0).to(t.dtype)[:, None, None]


def lora_expand_ref(y: torch.Tensor, t: torch.Tensor, b_stack: torch.Tensor, index: torch.Tensor,
                    scale: torch.Tensor, segments) -> torch.Tensor:
    """y + scale[a] * (t's segment g) @ B[a][segment g rows]^T per segment, rows with index < 0 unchanged."""
    rank = b_stack.shape[2]
    has = index >= 0
    a = index.long().clamp(min=0)
    b = b_stack[a].float()  # [B, N, R]
    parts, start = [], 0
    for g, size in enumerate(segments):
        parts.append(torch.einsum("bsr,bnr->bsn", t[..., g * rank:(g + 1) * rank], b[:, start:start + size]))
        start += size
    delta = torch.cat(parts, dim=-1) * (scale[a] * has.to(torch.float32))[:, None, None]
    return torch.where(has[:, None, None], (y.float() + delta).to(y.dtype), y)
