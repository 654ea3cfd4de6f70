"""Skinny GEMM (GEMV at batch 1): y = x @ W^T for a few rows of x, the decode-time matmul; W full
precision, or packed (edgellm/quant/formats.py: int8 / fp8 per output channel, int4 per group),
dequantized tile by tile as it streams in, so the step reads the packed bytes only.

At decode, a linear layer reads its whole weight matrix for one or a few tokens: the time is the
weight bytes over the bandwidth reached. cuBLAS leaves part of that bandwidth unused at small batch
(DESIGN.md: 1.6 of 2.97 TB/s on an 8192x2048 fp16 GEMV), so this kernel streams W with many loads in
flight: each program owns BLOCK_N output features and walks K in BLOCK_K steps, multiplying the
(padded to 16) rows of x on the tensor cores. One row of x (batch-1 decode, the latency case) goes
to the CUDA cores instead (_row_gemv): no padding rows, no operand shuffles into the tensor-core
layout, and small BLOCK_N, so even a narrow matrix gets a few programs per SM (for packed weights 2-3x
faster than the tensor-core tile, for fp16 a few percent, on the H100).
"""

import torch

from .dispatch import run_settings
from ._triton import dot_precision, pdl_release, pdl_wait, pow2, prefetch_l2, tl, triton, use_pdl
from .gemv_weights import QUANT_CODES, _int4_dots, _row_gemv, _weight_tile, codes_mode
from .gemv_fusions import (RopeAppend, check_fusions, check_sums, load_x, rope_append_epilogue, rope_operands, row_rstd,
                           sum_in_order)
from .rms_norm import rms_norm_ref
from .split_k import COUNTERS, auto_splits, counters, k_split, sm_count, split_k_sum
from .rope_append import rope_kv_append_ref
from .glu import GATE_ACTIVATIONS, gate_activation, glu_ref
from .lora import _segment_ends, check_expand_operands, delta_constants, extended_b, lora_delta, lora_expand_ref, lora_t

MAX_ROWS = 16  # rows of x decode sends to the GEMV (a block of 16, padded for tl.dot; more to cuBLAS)
# Packed weights (edgellm/quant) at up to this many rows stay in the GEMV, in blocks of up to 64 rows a
# program, rather than being dequantized whole for cuBLAS at every step.
PACKED_MAX_ROWS = 64
# (BLOCK_N, BLOCK_K, num_warps, num_stages): chosen from H100 sweeps (bench/gemv.py). The layer
# matrices of a 2-16-row step (bench/chain.py --tiles, a step's GEMVs under PDL) want narrow 2-warp
# tiles, five stages deep: more programs per SM, each with 64 KB in flight (Llama-3.2-1B shape, 16 rows:
# 924 -> 842 us a step; 4 rows 933 -> 818); an LM head (not swept that way; told apart by its shape:
# a vocabulary of over 16x the hidden size, where a layer's gate/up has at most ~11x) keeps the wide tile.
DEFAULT_TILE = (32, 256, 4, 4)
LAYER_TILE = (16, 256, 2, 5)
# Packed formats (bench/quant.py sweep, H100): wide matrices like (64, 256), narrow ones (N < 8192,
# few programs) like (32, 512); int4 has no good tile yet (none swept reaches fp16's speed).
QUANT_TILES = {"int8": (32, 512, 4, 4), "int4": (64, 128, 4, 4), "fp8": (32, 512, 4, 4)}
WIDE_QUANT_TILE = (64, 256, 4, 4)


def _tile(quant: str | None, n: int, k: int):
    if quant is None:
        return LAYER_TILE if n <= 16 * k else DEFAULT_TILE
    chosen = run_settings().int4_tile if quant == "int4" else run_settings().byte_tile  # (A/B switches)
    if chosen is not None:
        return chosen
    return WIDE_QUANT_TILE if quant in ("int8", "fp8") and n >= 8192 else QUANT_TILES[quant]


def _row_tile(quant: str | None, n: int, k: int):
    """(BLOCK_N, BLOCK_K, warps, stages) for one row (H100 sweep, bench/gemv.py): narrow matrices get
    4-row programs (about 4 per SM on a 1B-class layer), long rows long K tiles; packed formats
    prefer 2-warp programs, wide packed matrices more rows a program."""
    block_k = 1024 if k >= 8192 else 512
    if quant is None:
        return (4, block_k, 4, 3)
    if n < 8192 or (quant == "int4" and n < 65536):
        # (int4 rows of 8192 want 4 warps: 9.2 against 14.2 us on the 1B shape's down projection)
        return (4, block_k, 4 if quant == "int4" and k >= 8192 else 2, 3)
    return (16, 256, 2, 3)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, m, n, k, s_xm, s_wn, s_ym,
                 t_ptr, lb_ptr, idx_ptr, used_ptr, scale_ptr, n_splits, end0, end1, s_bs,
                 sc_ptr, zp_ptr, s_sn, group: tl.constexpr, nw_ptr, eps, r_ptr, s_rm, nsq_ptr, s_nsq, n_parts, sq_ptr,
                 s_sq,
                 cos_ptr, sin_ptr, kc_ptr, vc_ptr, slots_ptr, starts_ptr, lens_ptr, seq_len, n_pos, half, n_q, n_kv,
                 c_slot, c_head, c_pos, ws_ptr, cnt_ptr, k_chunk,
                 HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NUM_STAGES: tl.constexpr, PDL: tl.constexpr, HAS_LORA: tl.constexpr, GROUPS: tl.constexpr, RANK: tl.constexpr,
                 SPLITS: tl.constexpr, BLOCK_GR: tl.constexpr, LORA_PRECISION: tl.constexpr, UNROLL: tl.constexpr,
                 ONE_ROW: tl.constexpr, QUANT: tl.constexpr, ROW_FMA: tl.constexpr, PREFETCH: tl.constexpr,
                 LINE: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr,
                 ROPE: tl.constexpr, SUMSQ: tl.constexpr, BLOCK_P: tl.constexpr,
                 ORDERED_SUMS: tl.constexpr, CODES: tl.constexpr, WEIGHTS_FIRST: tl.constexpr,
                 SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr):
    j = tl.arange(0, BLOCK_N)
    if GLU:  # the tile's rows pair each output feature's gate row with its up row (n rows further)
        rows_n = tl.program_id(0) * (BLOCK_N // 2) + j // 2  # the output feature of each tile row
        w_rows = rows_n + (j % 2) * n
    elif ROPE:  # the tile's rows pair each feature d < half of a head with its rotation partner d + half
        rows_n = tl.program_id(0) * (BLOCK_N // 2) + j // 2  # the pair of each tile row
        w_rows = (rows_n // half) * (2 * half) + rows_n % half + (j % 2) * half
    else:
        rows_n = tl.program_id(0) * BLOCK_N + j
        w_rows = rows_n
    rows_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # (a block of rows a program: more go to more)
    cols = tl.arange(0, BLOCK_K)
    n_ok = rows_n < n
    m_ok = rows_m < m
    if PREFETCH > 0:  # the first PREFETCH lines of each weight row towards L2 while the kernel before runs
        lines = tl.arange(0, PREFETCH) * LINE
        prefetch_l2(w_ptr + w_rows.to(tl.int64)[:, None] * s_wn + lines[None, :], n_ok[:, None] & (lines < k)[None, :])
    if HAS_LORA:
        # The LoRA expand as an epilogue (kernels/lora.py). The adapter loads (index, used slots, B of
        # the batch's first adapter, the only one at batch 1, its scale) are issued before the wait,
        # as in lora.shrink_tile, and t, which the kernel before wrote, right after it, before the K loop.
        adapter = tl.load(idx_ptr + rows_m, mask=m_ok, other=-1)
        n_used = tl.load(used_ptr)
        first = tl.load(used_ptr + 1)
        hit = (adapter == first) & (n_used > 0)
        b_offs, b_mask = extended_b(rows_n, n_ok, end0, end1, RANK, GROUPS, BLOCK_GR)
        b_first = tl.load(lb_ptr + first * s_bs + b_offs, mask=b_mask & (b_offs * 0 + n_used > 0), other=0.0)
        scale_first = tl.load(scale_ptr + first)
    pdl_wait(PDL)
    if HAS_LORA:
        # t, written by the kernel before. Its loads cost in proportion to their size, padding rows
        # included (H100: 8 splits x 16 rows x 64 took 3 us of a 5 us GEMV), so batch 1, the latency
        # case, loads its one row: [SPLITS, BLOCK_GR], not [SPLITS, 16, BLOCK_GR].
        if ONE_ROW:
            sp = tl.arange(0, SPLITS)
            c = tl.arange(0, BLOCK_GR)
            live = (sp < n_splits) & (sp * 0 + n_used > 0)  # (the row has an adapter: n_used is 1)
            t_parts = tl.load(t_ptr + sp[:, None] * (GROUPS * RANK) + c[None, :],
                              mask=live[:, None] & (c < GROUPS * RANK)[None, :], other=0.0)
        else:
            t_parts = lora_t(t_ptr, rows_m, m_ok & (adapter >= 0), m, n_splits, SPLITS, GROUPS * RANK, BLOCK_GR)
    w_base = w_ptr + w_rows.to(tl.int64)[:, None] * s_wn
    x_base = x_ptr + rows_m[:, None] * s_xm
    if ROPE:
        cos, sin, slot, cache_pos, live = rope_operands(rows_m, m_ok, cos_ptr, sin_ptr, slots_ptr, starts_ptr, lens_ptr,
                                                         seq_len, n_pos, half, n, BLOCK_N)
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if NORM == 1:
        rstd = row_rstd(x_base, m_ok, k, eps, BLOCK_M, BLOCK_K)
    elif NORM == 2:  # the rows' sums of squares from the parts the GEMV that wrote x left (SUMSQ), in a fixed order
        p = tl.arange(0, BLOCK_P)
        parts = tl.load(nsq_ptr + p[:, None] * s_nsq + rows_m[None, :], mask=(p < n_parts)[:, None] & m_ok[None, :],
                        other=0.0)
        if ORDERED_SUMS:  # (batch-invariant: the same order at any batch size, sum_in_order says why)
            total = sum_in_order(parts, BLOCK_P, BLOCK_M)
        else:  # (one order per compiled kernel: the same bits run after run)
            total = tl.sum(parts, axis=0)
        rstd = 1.0 / tl.sqrt(total / k + eps)
    k_lo = tl.program_id(2) * k_chunk  # (split-K: this program's part of K; k_chunk a multiple of BLOCK_K)
    k_hi = tl.minimum(k, k_lo + k_chunk)
    if ROW_FMA:  # BLOCK_M is 1
        acc = _row_gemv(x_ptr, w_base, n_ok, sc_ptr, zp_ptr, w_rows, s_sn, k, k_lo, k_hi, group, nw_ptr,
                        tl.sum(rstd, axis=0), BLOCK_N, BLOCK_K, NUM_STAGES, QUANT, NORM, CODES == 2)[None, :]
    elif QUANT == 2:
        if CODES >= 3:  # (the weight rows as int16 words, x's and the norm weight's as int32 pairs of halves)
            w16_base = w_ptr.to(tl.pointer_type(tl.int16)) + w_rows.to(tl.int64)[:, None] * (s_wn // 2)
            x32_base = x_ptr.to(tl.pointer_type(tl.int32)) + rows_m[:, None] * (s_xm // 2)
            nw32_ptr = nw_ptr.to(tl.pointer_type(tl.int32))
        else:
            w16_base, x32_base, nw32_ptr = w_base, x_base, nw_ptr
        acc = _int4_dots(x_base, x32_base, m_ok, w_base, w16_base, n_ok, sc_ptr, zp_ptr, w_rows, s_sn, k, k_lo, k_hi,
                         group, nw_ptr, nw32_ptr, rstd,
                         BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES, PRECISION, NORM, CODES, WEIGHTS_FIRST, EVEN_K)
    else:
        if WEIGHTS_FIRST:  # (packed weights: W x^T, gemv_weights._int4_dots says why)
            acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if QUANT == 1:  # int8 codes less the row's zero: integers in -255..255, exact in fp16 and bf16
            zero = tl.load(zp_ptr + w_rows, mask=n_ok, other=0.0).to(tl.float32)
            if x_ptr.dtype.element_ty == tl.float16:  # (taken off in _weight_tile then, with 1024: _int8_halves)
                zero += 1024.0
            zero = zero.to(x_ptr.dtype.element_ty)[:, None]
        else:
            zero = tl.zeros([BLOCK_N, 1], dtype=x_ptr.dtype.element_ty)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
            kk = k0 + cols
            x = load_x(x_base + kk[None, :], m_ok[:, None] & (kk < k)[None, :], nw_ptr + kk[None, :], (kk < k)[None, :],
                      rstd[:, None], NORM)
            w = _weight_tile(w_base, kk, k, n_ok, x_ptr.dtype.element_ty, QUANT, zero, CODES == 2)
            if QUANT == 1 and x_ptr.dtype.element_ty != tl.float16:
                w -= zero
            if WEIGHTS_FIRST:
                acc_t += tl.dot(w, tl.trans(x), input_precision=PRECISION)
            else:
                acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        if WEIGHTS_FIRST:
            acc = tl.trans(acc_t)
    if SPLIT_K > 1:  # the last program of the tile to finish adds the parts up, in split order; the rest store nothing
        acc, last = split_k_sum(acc, ws_ptr, cnt_ptr, BLOCK_M, BLOCK_N, SPLIT_K)
        m_ok = m_ok & last
        if ROPE:
            live = live & last
    if QUANT == 1 or QUANT == 3:  # per-output-channel scales, once
        acc *= tl.load(sc_ptr + w_rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + w_rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        t = tl.sum(t_parts, axis=0).to(lb_ptr.dtype.element_ty)  # rounded as the unfused lora_A output would be
        if ONE_ROW:  # one dot product per output feature, no tensor-core tile of 15 padding rows
            delta = tl.sum(b_first.to(tl.float32) * t.to(tl.float32)[None, :], axis=1) * scale_first
            acc += tl.where((hit & (rows_m == 0))[:, None], delta[None, :], 0.0)
        else:
            acc += tl.where(hit[:, None], tl.dot(t, tl.trans(b_first), input_precision=LORA_PRECISION) * scale_first,
                            0.0)
            if n_used > 1:  # the batch's other adapters
                acc = lora_delta(acc, t, lb_ptr, b_offs, b_mask, scale_ptr, used_ptr, adapter, s_bs, 1, UNROLL,
                                 LORA_PRECISION)
    pdl_release(PDL)
    out = acc.to(y_ptr.dtype.element_ty)  # rounded as the unfused projection's output
    out_cols = rows_n
    out_ok = n_ok
    if GLU:  # act(gate) * up as kernels/glu.py computes it, one output per pair of tile rows
        gate, up = tl.split(tl.reshape(out, [BLOCK_M, BLOCK_N // 2, 2]))
        out = gate_activation(gate, GLU == 2) * up
        out_cols = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        out_ok = out_cols < n
    if ROPE:
        rope_append_epilogue(out, rows_m, m_ok, y_ptr, s_ym, cos, sin, slot, cache_pos, live, kc_ptr, vc_ptr, half,
                              n_q, n_kv, n, c_slot, c_head, c_pos, BLOCK_M, BLOCK_N)
    else:
        mask = m_ok[:, None] & out_ok[None, :]
        if RESIDUAL:  # the residual stream's add, as the next norm kernel would do it
            out += tl.load(r_ptr + rows_m[:, None] * s_rm + out_cols[None, :], mask=mask, other=0.0)
        tl.store(y_ptr + rows_m[:, None] * s_ym + out_cols[None, :], out, mask=mask)
        if SUMSQ:  # this tile's part of each output row's sum of squares, for the next GEMV's RMSNorm (no
            f = tl.where(mask, out.to(tl.float32), 0.0)  # atomics: their order, and so the sum, varies by run)
            tl.store(sq_ptr + tl.program_id(0) * s_sq + rows_m, tl.sum(f * f, axis=1), mask=m_ok)


# Weight prefetch before the wait (H100): the first 4 KB of each row of a small matrix (SmolLM2-135M
# shape's 0.6-3.5 MB: batch 1 1822 -> 1902 tok/s) towards L2; large ones lose by it (Llama-3.2-1B
# shape's 8-67 MB: 897 -> 842), their prefetches competing with the kernel before.
PREFETCH_ROW_BYTES = 4096
PREFETCH_MAX_MATRIX = 4 << 20


def _prefetch_lines(pdl: int, quant: str | None, n: int, k: int, element: int) -> int:
    """128-byte lines of each weight row to prefetch before the wait (RunSettings.gemv_prefetch: bytes
    per row, 0: none, overriding the default): only under PDL (without it the kernel before has
    finished at launch anyway) and for full-precision weights."""
    setting = run_settings().gemv_prefetch
    wanted = setting if setting is not None else \
        PREFETCH_ROW_BYTES if n * k * element <= PREFETCH_MAX_MATRIX else 0
    if not pdl or quant is not None or wanted <= 0:
        return 0
    return min(pow2(wanted // 128), pow2(triton.cdiv(k * element, 128)))


def _launch_tile(weight, row_fma: bool, pairs: bool, tile=None) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, warps, stages, programs along N) of a launch: the given tile (its fifth entry, if
    any, is the split of K: _splits) or the one chosen
    for the weight's rows (glu: twice the outputs), K tiles no longer than the padded row (int4: whole
    blocks of 32); with pairs (glu, rope) a program's BLOCK_N rows make BLOCK_N / 2 outputs."""
    quant = getattr(weight, "kind", None)
    rows_w, k = weight.shape
    chosen = tile or (_row_tile(quant, rows_w, k) if row_fma else _tile(quant, rows_w, k))
    block_n, block_k, warps, stages = chosen[:4]
    block_k = min(block_k, pow2(k, 32 if quant == "int4" else 16))
    if pairs:
        block_n = max(block_n, 2)  # a tile holds pairs of rows (gate and up; a rotation's two features)
    programs = triton.cdiv(rows_w // 2, block_n // 2) if pairs else triton.cdiv(rows_w, block_n)
    return block_n, block_k, warps, stages, programs


def _pairs_aligned(x2: torch.Tensor, norm) -> bool:
    """Whether x's rows (and the norm weight) can be read as 32-bit pairs of halves (the int4 words path,
    taken up to 16 rows a program: past them its x tile costs more than the words save, bench/sass_gemv.py;
    the engine's rows are always aligned, so a row's path, and its sums, do not change with the batch
    below 17 rows)."""
    tensors = [x2] + ([norm[0]] if norm is not None else [])
    return x2.shape[-1] % 2 == 0 and x2.stride(0) % 2 == 0 and all(t.data_ptr() % 4 == 0 for t in tensors)


def _splits(tile) -> int:
    """The split of K a tile asks for (kernels/split_k.py): its fifth entry, else none."""
    return tile[4] if tile is not None and len(tile) > 4 else 1


def _row_block(rows: int, row_fma: bool) -> int:
    """Rows of x a program takes: one on the CUDA cores; else 16, or past 16 rows the power of two that
    holds them, up to 64 (each program reads the whole weight: fewer blocks, fewer reads). Batch-invariant:
    always 16 (another tile shape could add a row's products in another order)."""
    if row_fma:
        return 1
    if rows <= 16 or run_settings().batch_invariant:
        return 16
    return min(64, pow2(rows))


def _row_fma(rows: int, weight=None) -> bool:
    """Whether one row goes to the CUDA cores by default: it is faster, but it adds up each dot product in
    another order than the tensor-core tile, so not where a row must come out the same at any batch size
    (RunSettings.batch_invariant); packed weights not under RunSettings.packed_row_dots (an A/B)."""
    settings = run_settings()
    if settings.packed_row_dots and getattr(weight, "kind", None) is not None:
        return False
    return rows == 1 and not settings.batch_invariant


def sumsq_parts(weight, rows: int, *, glu: str | None = None, tile=None) -> int:
    """The parts (one per program) of a sumsq_out buffer for gemv(x of `rows` rows, weight, glu=, tile=)."""
    return _launch_tile(weight, _row_fma(rows, weight), glu is not None, tile)[-1]


def supports(weight) -> bool:
    """Whether the GEMV reads this weight (int4 groups must hold whole blocks of 32 columns)."""
    return getattr(weight, "kind", None) != "int4" or weight.group % 32 == 0


def gemv(x: torch.Tensor, weight, bias: torch.Tensor | None = None, *, tile=None,
         lora=None, row_fma: bool | None = None, norm=None, glu: str | None = None,
         residual: torch.Tensor | None = None, rope_append: RopeAppend | None = None,
         norm_sumsq: torch.Tensor | None = None, sumsq_out: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., K] (made for a few rows: blocks of 16, or up to 64 past 16 rows, go to programs of their
    own, each reading the whole weight; _row_block); weight: [N, K], a tensor or a QuantizedWeight; bias: [N] or None ->
    [..., N]. lora: None, or (t, b_stack, index, used, scale, segments) as lora_expand takes them: adds
    each row's adapter delta in the epilogue. row_fma: one row of x on the CUDA cores (default: when x
    has one row, unless RunSettings.batch_invariant).

    Fused neighbours of a decode step (each saves a launch, computed as the separate kernel would):
    norm=(norm_weight, eps): x goes through rms_norm first; glu="silu" | "gelu_tanh": weight holds
    gate rows then up rows and the result is glu's, [..., N / 2]; residual ([..., N]): added to
    the result (the residual stream's add of add_rms_norm); rope_append (RopeAppend; x [B, S, K], weight
    the qkv projection): rope_kv_append's work, returning the rotated queries [B, S, q_heads * head_dim]
    and appending the keys and values to the cache.

    Sums of squares, so that a norm over several rows needs no pass of its own over x: sumsq_out
    ([parts, rows] float32, zeroed by the caller, parts >= sumsq_parts(...)) gets each program's part of
    each output row's sum of squares (of the result as stored, the residual included); norm_sumsq
    ([parts, rows] float32, with norm=): x's rows' sums of squares in parts, as an earlier GEMV's
    sumsq_out left them, added up in a fixed order, which the norm then uses instead of reading x."""
    *lead, k = x.shape
    quant = getattr(weight, "kind", None)  # a QuantizedWeight (edgellm/quant)
    pairs = glu is not None or rope_append is not None  # tiles of row pairs: n counts pairs
    n = weight.shape[0] // (2 if pairs else 1)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    data = weight.data if quant else weight
    if weight.shape[1] != k or data.stride(-1) != 1:
        raise ValueError(f"gemv: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    check_fusions(x, weight, lora, norm, glu, residual, lead, n, rope_append)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = residual.reshape(-1, n).contiguous() if residual is not None else x2
    if row_fma is None:
        row_fma = _row_fma(m, weight)
    if row_fma and m != 1:
        raise ValueError(f"gemv: row_fma takes one row of x, got {m}")
    block_n, block_k, warps, stages, programs = _launch_tile(weight, row_fma, pairs, tile)
    block_m = _row_block(m, row_fma)
    if block_m > 16 and tile is None:  # (x's tile of each pipeline stage within 16 KB of shared memory)
        block_k = min(block_k, 8192 // block_m)
    if quant == "int4":
        if not supports(weight):
            raise ValueError(f"gemv: int4 groups must be a multiple of 32, got {weight.group}")
        if not row_fma:  # a tensor-core K tile lies in one group: the largest power of two dividing it
            block_k = min(block_k, weight.group & -weight.group)
    wanted = _splits(tile)
    if tile is None and quant is not None and not row_fma and run_settings().gemv_split == "auto":
        wanted = auto_splits(programs, k, block_k, sm_count(x.device))
    splits, chunk = k_split(k, block_k, wanted)
    ws = cnt = None
    if splits > 1:
        cnt, tiles = counters(x.device), programs * triton.cdiv(m, block_m)
        if cnt is None or tiles > COUNTERS:
            splits, chunk = 1, k
        else:
            ws = torch.empty(tiles * splits * block_m * block_n, dtype=torch.float32, device=x.device)
    if quant == "fp8":
        data = data.view(torch.uint8)  # decoded from its bits in the kernel (_weight_tile)
    scales = weight.scales if quant else data
    zeros = weight.zeros if quant in ("int4", "int8") else scales
    out_n = rope_append.q_heads * rope_append.k_cache.shape[-1] if rope_append is not None else n
    y = torch.empty(m, out_n, dtype=x.dtype, device=x.device)
    if rope_append is not None:
        r = rope_append
        rope_args = (r.cos.contiguous(), r.sin.contiguous(), r.k_cache, r.v_cache, r.slots, r.starts, r.lengths,
                     x.shape[1], r.cos.shape[0], r.cos.shape[-1], r.q_heads, r.k_cache.shape[1], *r.k_cache.stride()[:3])
        assert r.k_cache.stride() == r.v_cache.stride() and r.k_cache.stride(-1) == 1
    else:
        rope_args = (y, y, y, y, y, y, y, 1, 1, 1, 0, 0, 0, 0, 0)
    pdl = use_pdl(x)
    prefetch = _prefetch_lines(pdl, quant, weight.shape[0], k, data.element_size())
    if lora is None:
        lora_args = (y, y, y, y, y, 0, 0, 0, 0)
        constants = dict(HAS_LORA=False, GROUPS=1, RANK=16, SPLITS=1, BLOCK_GR=16, LORA_PRECISION="ieee", UNROLL=1,
                         ONE_ROW=False)
    else:
        t, b_stack, index, used, scale, segments = lora
        check_expand_operands(m, n, t, b_stack, segments, "gemv")
        if index.shape != (m,):
            raise ValueError(f"gemv: LoRA index {tuple(index.shape)} needs one entry per row of x ({m})")
        lora_args = (t, b_stack, index, used, scale, t.shape[0], *_segment_ends(list(segments)), b_stack.stride(0))
        constants = {**delta_constants(t, b_stack, segments), "HAS_LORA": True, "ONE_ROW": _row_fma(m)}
        constants["LORA_PRECISION"] = constants.pop("PRECISION")
    check_sums(m, programs, norm, norm_sumsq, sumsq_out, rope_append)
    norm_sums = (norm_sumsq, norm_sumsq.stride(0), norm_sumsq.shape[0]) if norm_sumsq is not None else (y, 0, 0)
    out_sums = (sumsq_out, sumsq_out.stride(0)) if sumsq_out is not None else (y, 0)
    _gemv_kernel[(programs, triton.cdiv(m, block_m), splits)](
        x2, data, bias if bias is not None else y, y, m, n, k, x2.stride(0), data.stride(0), y.stride(0),
        *lora_args, scales, zeros, scales.stride(0) if scales.dim() == 2 else 1, weight.group if quant == "int4" else 1,
        norm[0] if norm is not None else x2, norm[1] if norm is not None else 0.0, r2, r2.stride(0),
        *norm_sums, *out_sums, *rope_args, ws if ws is not None else y, cnt if cnt is not None else y, chunk,
        HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, NUM_STAGES=stages, PDL=pdl, **constants, QUANT=QUANT_CODES[quant], ROW_FMA=row_fma,
        PREFETCH=prefetch, LINE=128 // data.element_size(), NORM=0 if norm is None else 1 if norm_sumsq is None else 2,
        GLU=0 if glu is None else 1 + GATE_ACTIVATIONS.index(glu), RESIDUAL=residual is not None,
        ROPE=rope_append is not None, SUMSQ=sumsq_out is not None,
        BLOCK_P=pow2(norm_sumsq.shape[0]) if norm_sumsq is not None else 1, ORDERED_SUMS=run_settings().batch_invariant,
        CODES=codes_mode(quant, x.dtype, quant == "int4" and block_m <= 16 and _pairs_aligned(x2, norm)),
        WEIGHTS_FIRST=quant is not None and run_settings().packed_operands == "weights", SPLIT_K=splits,
        EVEN_K=quant == "int4" and k % block_k == 0,
        num_warps=warps, launch_pdl=pdl > 0)
    return y.reshape(*lead, out_n)


def gemv_ref(x: torch.Tensor, weight, bias: torch.Tensor | None = None, *, tile=None,
             lora=None, row_fma: bool | None = None, norm=None, glu: str | None = None,
             residual: torch.Tensor | None = None, rope_append: RopeAppend | None = None,
             norm_sumsq: torch.Tensor | None = None, sumsq_out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) in x's dtype: torch's linear (cuBLAS on the GPU), over the dequantized
    weight when it is packed; plus lora_expand_ref. The fused neighbours as their own references:
    rms_norm_ref before (from x itself: norm_sumsq only says what x's sums of squares are), glu_ref
    (glu), the residual add or rope_kv_append_ref after; sumsq_out's first part gets the result's sums of squares."""
    *lead, _ = x.shape
    pairs = glu is not None or rope_append is not None
    check_fusions(x, weight, lora, norm, glu, residual, lead, weight.shape[0] // (2 if pairs else 1), rope_append)
    check_sums(x.reshape(-1, x.shape[-1]).shape[0], 1, norm, norm_sumsq, sumsq_out, rope_append)
    if getattr(weight, "kind", None):
        from ..quant.formats import dequantize

        weight = dequantize(weight, x.dtype)
    if norm is not None:
        x = rms_norm_ref(x, norm[0], norm[1])
    y = torch.nn.functional.linear(x, weight, bias)
    if lora is not None:
        y = lora_expand_ref(y, *lora)
    if glu is not None:
        y = glu_ref(y, activation=glu)
    if rope_append is not None:
        r = rope_append
        batch, seq, _ = y.shape
        head_dim, kv_heads = r.k_cache.shape[-1], r.k_cache.shape[1]
        q, k, v = y.split([r.q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q = rope_kv_append_ref(q.reshape(batch, seq, r.q_heads, head_dim), k.reshape(batch, seq, kv_heads, head_dim),
                               v.reshape(batch, seq, kv_heads, head_dim), r.cos, r.sin, r.k_cache, r.v_cache, r.slots,
                               r.starts, r.lengths)
        return q.reshape(batch, seq, -1)
    y = y if residual is None else y + residual
    if sumsq_out is not None:  # (all in its first part)
        sumsq_out[0] += y.reshape(-1, y.shape[-1]).float().square().sum(-1)
    return y
