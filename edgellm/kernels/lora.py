"""LoRA for a batch whose tokens use different adapters (or none): y += scale[a] * (x @ A[a]^T) @ B[a]^T
with a = index[token], gathered from stacks that hold every loaded adapter.

One projection group at a time: a fused weight (qkv, gate_up) has G segments (q, k, v / gate, up),
each with its own A (R rows) and B. So A stacks are [adapters, G*R, K] (segment g in rows g*R..) and
B stacks [adapters, N, R] (output features in segment order); ranks below R are zero-padded.

- `lora_shrink`: t = x @ A[a]^T per token, float32, returned as partial sums over K splits,
  [splits, M, G*R] (their sum is the product);
- `lora_expand`: y[m, n] += scale[a_m] * t[m, seg(n)*R : seg(n)*R + R] . B[a_m, n, :], in place.

Kernels. Prefill-sized batches: a tile is BLOCK_M tokens (rows) whatever their adapters: each
program goes over the batch's adapters (`used`: their count, then their slots, made by the caller,
so no host sync; the first UNROLL are unrolled so that their loads are in flight together, except
in a shrink with one adapter) and, for each one some of its tokens use, loads that adapter's tile
once and multiplies it on the tensor cores, keeping the product only for that adapter's tokens.
Zero-rank gating: an adapter no token of the tile uses loads nothing, and a tile with no adapter
at all returns at once. The shrink splits K over programs (one BLOCK_K chunk each), so a 16 x 2048
adapter matrix is read by many SMs at once instead of one; the expand sums the splits in one load.

The expand sees all G segments as one product: t [M, G*R] times an "extended" B tile whose column
g*R + r holds B[n, r] for the output features n of segment g and zero elsewhere, so a tile that
spans segments still needs one load and one dot per adapter.

Decode-sized batches (at most 16 rows) launch neither kernel. The shrink is computed by the kernel
that produces its input (the RMSNorms, the decode-attention merge, act(gate) * up: `shrink_tile` and
`shrink_finish`), each of whose programs holds one row's chunk of K and writes that chunk's partial
sum; the expand is the base projection's GEMV epilogue (gemv.py). Both issue their adapter loads
before they wait for the kernel before them, and the GEMV its t load before its K loop. So LoRA
adds no launch to the decode step, and little latency.
"""

import torch

from ._triton import dot_precision, pdl_release, pdl_wait, pow2, tl, triton, use_pdl

BLOCK_M = 16
SHRINK_BLOCK_K = 256
UNROLL = 4  # the kernels unroll a batch's first UNROLL adapters (their loads in flight together)


@triton.jit
def _add_product(acc, lhs, tile_ptrs, mask, hit, scale, PRECISION: tl.constexpr):
    """acc + scale * lhs @ tile^T for the rows in `hit` (the rows of one adapter), tile loaded under `mask`."""
    tile = tl.load(tile_ptrs, mask=mask, other=0.0)
    return acc + tl.where(hit[:, None], tl.dot(lhs, tl.trans(tile), input_precision=PRECISION) * scale, 0.0)


@triton.jit
def shrink_tile(a_ptr, adapter, cols, cols_ok, gr, s_as, s_ar, BLOCK_R: tl.constexpr):
    """For the kernels that produce a row and fuse its LoRA shrink over one chunk of K (module doc):
    the first BLOCK_R rows of A[adapter] at `cols`, nothing loaded for a row with no adapter (-1).

    They call it before pdl_wait(): the index and the A stacks are written before a forward starts
    (the runner copies them in before its first kernel, which is not a PDL launch, and every PDL
    kernel after it starts only once that one has finished), so the load may overlap the kernel before."""
    r = tl.arange(0, BLOCK_R)
    mask = ((r < gr) & (r * 0 + adapter >= 0))[:, None] & cols_ok[None, :]  # (the interpreter wants tensor masks)
    return tl.load(a_ptr + adapter * s_as + r[:, None] * s_ar + cols[None, :], mask=mask, other=0.0)


@triton.jit
def shrink_finish(tile, y, cols, cols_ok, a_ptr, adapter, gr, s_as, s_ar, t_ptr, BLOCK_R: tl.constexpr):
    """Stores t_ptr[r] = sum over the chunk of A[adapter, r, cols] * y for r < gr: the first BLOCK_R
    rows from shrink_tile's `tile`, any further ones (ranks above what one tile holds) loaded here."""
    if adapter >= 0:
        y32 = y.to(tl.float32)[None, :]
        r = tl.arange(0, BLOCK_R)
        tl.store(t_ptr + r, tl.sum(tile.to(tl.float32) * y32, axis=1), mask=r < gr)
        for r0 in range(BLOCK_R, gr, BLOCK_R):
            rr = r0 + r
            a = tl.load(a_ptr + adapter * s_as + rr[:, None] * s_ar + cols[None, :],
                        mask=(rr < gr)[:, None] & cols_ok[None, :], other=0.0)
            tl.store(t_ptr + rr, tl.sum(a.to(tl.float32) * y32, axis=1), mask=rr < gr)


def chunk_rank_block(gr: int, chunk: int) -> int:
    """BLOCK_R for shrink_tile: A tiles of at most 16K elements (registers)."""
    return max(1, min(pow2(gr), 16384 // chunk))


def fused_shrink_args(lora_a, rows: int, k: int, splits: int, chunk: int, placeholder: torch.Tensor):
    """For a kernel that fuses the next projection's shrink (shrink_tile / shrink_finish) over
    `splits` chunks of `chunk` of its rows' k features: (t, the kernel's LoRA arguments, their
    constexprs). t is the [splits, rows, G*R] float32 output, None without lora_a (the arguments
    are then `placeholder` tensors and zeros, never read)."""
    if lora_a is None:
        return None, (placeholder,) * 3 + (0,) * 5, dict(BLOCK_R=1)
    a_stack, index, _ = lora_a
    if a_stack.dim() != 3 or a_stack.shape[2] != k or a_stack.stride(-1) != 1 or index.shape != (rows,):
        raise ValueError(f"LoRA shrink: A stack {tuple(a_stack.shape)} and index {tuple(index.shape)} do not fit "
                         f"{rows} rows of {k} features")
    t = torch.empty(splits, rows, a_stack.shape[1], dtype=torch.float32, device=placeholder.device)
    return t, (a_stack, index, t, a_stack.shape[1], a_stack.stride(0), a_stack.stride(1), t.stride(0), t.stride(1)), \
        dict(BLOCK_R=chunk_rank_block(a_stack.shape[1], chunk))


@triton.jit
def lora_t(t_ptr, rows, rows_on, m, n_splits, SPLITS: tl.constexpr, GR: tl.constexpr, BLOCK_GR: tl.constexpr):
    """The shrink's partial sums (contiguous [n_splits, m, GR]) of `rows` (those in rows_on; others 0):
    [SPLITS, rows, BLOCK_GR] float32, to be summed over axis 0. A separate load so that the GEMV can
    issue it before its K loop. GR is a constexpr so that the masks are known per vector: few loads."""
    sp = tl.arange(0, SPLITS)
    c = tl.arange(0, BLOCK_GR)
    return tl.load(t_ptr + (sp[:, None, None] * m + rows[None, :, None]) * GR + c[None, None, :],
                   mask=(sp < n_splits)[:, None, None] & rows_on[None, :, None] & (c < GR)[None, None, :], other=0.0)


@triton.jit
def extended_b(cols, n_ok, end0, end1, RANK: tl.constexpr, GROUPS: tl.constexpr, BLOCK_GR: tl.constexpr):
    """Offsets (in a contiguous [N, RANK] B) and mask of the extended B tile of output features `cols`
    (module doc): column g*RANK + r holds B[n, r] where feature n is in segment g (0 below end0, 1
    below end1, else 2). RANK is a constexpr: the divisions are shifts and the loads vectors."""
    c = tl.arange(0, BLOCK_GR)
    segment = (cols >= end0).to(tl.int32) + (cols >= end1).to(tl.int32)
    offs = cols[:, None] * RANK + (c % RANK)[None, :]
    mask = n_ok[:, None] & ((c // RANK)[None, :] == segment[:, None]) & (c < GROUPS * RANK)[None, :]
    return offs, mask


@triton.jit
def lora_delta(acc, t, b_ptr, b_offs, b_mask, scale_ptr, used_ptr, adapter, s_bs, START: tl.constexpr,
               UNROLL: tl.constexpr, PRECISION: tl.constexpr):
    """acc + each row's scale[a] * t[row] . extended B[a] (module doc), for the batch's used adapters
    from the START-th on; rows without an adapter get nothing. t: [rows, BLOCK_GR] in the model dtype."""
    n_used = tl.load(used_ptr)
    for j in tl.static_range(START, UNROLL):
        slot = tl.load(used_ptr + 1 + j)
        hit = (adapter == slot) & (j < n_used)
        some = tl.max(hit.to(tl.int32), axis=0, keep_dims=True) > 0  # [1]: the interpreter wants tensor masks
        acc = _add_product(acc, t, b_ptr + slot * s_bs + b_offs, b_mask & some[:, None], hit, tl.load(scale_ptr + slot),
                           PRECISION)
    for i in range(UNROLL, n_used):
        slot = tl.load(used_ptr + 1 + i)
        hit = adapter == slot
        if tl.max(hit.to(tl.int32), axis=0) > 0:
            acc = _add_product(acc, t, b_ptr + slot * s_bs + b_offs, b_mask, hit, tl.load(scale_ptr + slot), PRECISION)
    return acc


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, idx_ptr, used_ptr, t_ptr, m, k, gr, s_xm, s_as, s_ar, s_tsplit, s_tm,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, UNROLL: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < m
    adapter = tl.load(idx_ptr + rows, mask=row_ok, other=-1)
    if tl.max(adapter, axis=0) >= 0:
        kk = split * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = kk < k
        a_mask = (r < gr)[:, None] & k_ok[None, :]
        a_offs = r[:, None] * s_ar + kk[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * s_xm + kk[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        n_used = tl.load(used_ptr)
        if n_used > 1:
            # Several adapters in the batch: the first UNROLL unrolled, their loads in flight together
            # (a tile's load is masked off unless the tile uses that adapter: no traffic).
            for j in tl.static_range(UNROLL):
                slot = tl.load(used_ptr + 1 + j)
                hit = (adapter == slot) & (j < n_used)
                some = tl.max(hit.to(tl.int32), axis=0, keep_dims=True) > 0  # [1]: the interpreter wants tensor masks
                acc = _add_product(acc, x, a_ptr + slot * s_as + a_offs, a_mask & some[:, None], hit, 1.0, PRECISION)
        # One at a time: a single adapter (unrolled, that case ran 4.5 instead of 2.6 us on the H100),
        # or those past the first UNROLL.
        for i in range(tl.where(n_used > 1, UNROLL, 0), n_used):
            slot = tl.load(used_ptr + 1 + i)
            hit = adapter == slot
            if tl.max(hit.to(tl.int32), axis=0) > 0:
                acc = _add_product(acc, x, a_ptr + slot * s_as + a_offs, a_mask, hit, 1.0, PRECISION)
        pdl_release(PDL)
        tl.store(t_ptr + split * s_tsplit + rows.to(tl.int64)[:, None] * s_tm + r[None, :], acc,
                 mask=row_ok[:, None] & (r < gr)[None, :])


@triton.jit
def _lora_expand_kernel(y_ptr, t_ptr, b_ptr, idx_ptr, used_ptr, scale_ptr, m, n, n_splits, end0, end1, s_ym, s_bs,
                        GROUPS: tl.constexpr, RANK: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
                        UNROLL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_GR: tl.constexpr,
                        PDL: tl.constexpr):
    pdl_wait(PDL)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < m
    adapter = tl.load(idx_ptr + rows, mask=row_ok, other=-1)
    if tl.max(adapter, axis=0) >= 0:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = cols < n
        lora_rows = row_ok & (adapter >= 0)
        t = tl.sum(lora_t(t_ptr, rows, lora_rows, m, n_splits, SPLITS, GROUPS * RANK, BLOCK_GR), axis=0)
        b_offs, b_mask = extended_b(cols, n_ok, end0, end1, RANK, GROUPS, BLOCK_GR)
        # t rounded to the model dtype, as the unfused lora_A output would be
        delta = lora_delta(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), t.to(b_ptr.dtype.element_ty), b_ptr, b_offs,
                           b_mask, scale_ptr, used_ptr, adapter, s_bs, 0, UNROLL, PRECISION)
        y_tile = y_ptr + rows.to(tl.int64)[:, None] * s_ym + cols[None, :]
        mask = lora_rows[:, None] & n_ok[None, :]
        y = tl.load(y_tile, mask=mask, other=0.0).to(tl.float32) + delta
        pdl_release(PDL)
        tl.store(y_tile, y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor, index: torch.Tensor, what: str) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if index.shape != (x2.shape[0],):
        raise ValueError(f"{what}: index {tuple(index.shape)} needs one entry per token of {tuple(x.shape)}")
    return x2


def used_slot_list(slots, capacity: int) -> list[int]:
    """The `used` argument of the LoRA ops for a batch whose tokens use adapter `slots` (-1: none), as
    a list of 1 + max(capacity, UNROLL) ints: the number of distinct slots, then the slots."""
    distinct = sorted({int(s) for s in slots if s >= 0})
    return [len(distinct)] + distinct + [0] * (max(capacity, UNROLL) - len(distinct))


def used_slots(slots, capacity: int, device) -> torch.Tensor:
    """used_slot_list as an int32 tensor on `device`."""
    return torch.tensor(used_slot_list(slots, capacity), dtype=torch.int32, device=device)


def lora_shrink(x: torch.Tensor, a_stack: torch.Tensor, index: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """x: [..., K] (M tokens); a_stack: [adapters, G*R, K]; index: [M] int32 (-1: no adapter); used:
    used_slots(...) of the batch -> [splits, M, G*R] float32 partial sums (rows without an adapter
    may be left unwritten)."""
    x2 = _rows(x, index, "lora_shrink")
    m, k = x2.shape
    gr = a_stack.shape[1]
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
        x2, a_stack, index, used, t, m, k, gr, x2.stride(0), a_stack.stride(0), a_stack.stride(1), t.stride(0),
        t.stride(1), PRECISION=dot_precision(x.dtype), BLOCK_M=BLOCK_M, BLOCK_R=block_r,
        BLOCK_K=block_k, UNROLL=UNROLL, PDL=pdl, num_warps=4, launch_pdl=pdl > 0)
    return t


def _segment_ends(segments) -> tuple[int, int]:
    if not 1 <= len(segments) <= 3:
        raise ValueError(f"lora: 1 to 3 segments per projection group, got {len(segments)}")
    ends = [sum(segments[:i + 1]) for i in range(len(segments))]
    return tuple((ends[:-1] + [ends[-1]] * 2)[:2])


def check_expand_operands(m: int, n: int, t: torch.Tensor, b_stack: torch.Tensor, segments, what: str) -> None:
    """What lora_expand and the GEMV's epilogue need of t ([splits, M, G*R], contiguous) and the B
    stack ([adapters, N, R], contiguous)."""
    rank = b_stack.shape[2]
    if b_stack.shape[1] != n or sum(segments) != n or t.dim() != 3 or t.shape[1:] != (m, len(segments) * rank):
        raise ValueError(f"{what}: {m} x {n} output, t {tuple(t.shape)}, B stack {tuple(b_stack.shape)} "
                         f"and segments {tuple(segments)} do not agree")
    if not (t.is_contiguous() and b_stack.is_contiguous()):
        raise ValueError(f"{what}: t and the B stack must be contiguous")


def lora_expand(y: torch.Tensor, t: torch.Tensor, b_stack: torch.Tensor, index: torch.Tensor, used: torch.Tensor,
                scale: torch.Tensor, segments) -> torch.Tensor:
    """y: [..., N] (the base projection of M tokens, updated in place and returned); t: lora_shrink's
    [splits, M, G*R]; b_stack: [adapters, N, R]; scale: [adapters] float32; segments: the G output
    sizes, summing to N."""
    y2 = _rows(y, index, "lora_expand")
    m, n = y2.shape
    check_expand_operands(m, n, t, b_stack, segments, "lora_expand")
    if not y.is_contiguous():
        raise ValueError("lora_expand: y (updated in place) must be contiguous")
    pdl = use_pdl(y)
    block_n = 64
    _lora_expand_kernel[(triton.cdiv(m, BLOCK_M), triton.cdiv(n, block_n))](
        y2, t, b_stack, index, used, scale, m, n, t.shape[0], *_segment_ends(list(segments)), y2.stride(0),
        b_stack.stride(0), **delta_constants(t, b_stack, segments), BLOCK_M=BLOCK_M, BLOCK_N=block_n, PDL=pdl,
        num_warps=4, launch_pdl=pdl > 0)
    return y


def delta_constants(t: torch.Tensor, b_stack: torch.Tensor, segments) -> dict:
    """The constexpr arguments of lora_t / extended_b / lora_delta for these tensors."""
    return dict(GROUPS=len(segments), RANK=b_stack.shape[2], SPLITS=pow2(t.shape[0]), UNROLL=UNROLL,
                BLOCK_GR=pow2(t.shape[2], 16), PRECISION=dot_precision(b_stack.dtype))


def lora_shrink_ref(x: torch.Tensor, a_stack: torch.Tensor, index: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Per token m with index[m] >= 0: x[m] @ a_stack[index[m]]^T in float32, as one split [1, M, G*R];
    tokens without an adapter give zeros."""
    x2 = _rows(x, index, "lora_shrink_ref").float()
    a = a_stack[index.long().clamp(min=0)].float()  # [M, G*R, K]
    t = torch.einsum("mk,mrk->mr", x2, a)
    return (t * (index >= 0).to(t.dtype)[:, None])[None]


def lora_expand_ref(y: torch.Tensor, t: torch.Tensor, b_stack: torch.Tensor, index: torch.Tensor, used: torch.Tensor,
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
