"""A persistent decode kernel: every decoder layer of a batch-1 decode step in one launch (issue 18).

Why: the kernel chain pays 1.3-4 us of launch, ramp-up and drain per kernel even inside a CUDA
graph, and a step is 356 kernels at the Llama-3.2-1B shape, 636 at SmolLM2-135M's; at batch 1 most
of those kernels read a few kB to a few hundred kB, far too little to hide that.

Structure: one program per SM loops over a static list of tiles. Each layer is five stages, each cut
into tiles that programs take round-robin:
  A  qkv: RMSNorm of the residual (recomputed by every tile: H values from L2), a slice of the fused
     qkv GEMV, RoPE, and the key/value written into the KV cache at the row's position;
  B  attention: one query head over the row's keys (online softmax in float32);
  C  o: a slice of the o-projection GEMV plus the residual add for its rows;
  D  gate_up: RMSNorm again, a slice of the gate and up GEMVs, SiLU(gate) * up;
  E  down: a slice of the down GEMV plus the residual add.
Instead of kernel boundaries, stage s of layer l waits until a counter in global memory says every
tile of the stage before it is done (ld.acquire in a spin loop), and each tile increments its own
stage's counter after a CTA barrier (atom.release). Stages form one chain, so every buffer's readers
have finished before it is written again. The counters are zeroed before each launch; a wait gives
up after SPIN_LIMIT polls and raises a flag (a bug then shows as a wrong answer, not a hung GPU).

Numerics follow the chain (model.forward_logits with the Triton ops): float32 accumulation, the
activations rounded to the model dtype where the chain rounds them (qkv, RoPE, attention output,
each projection, the residual sums, SiLU). The sums run in another order, so results agree to
rounding, not bit for bit. Under the interpreter the programs run one after another, so the
interpreter runs one program (which then never waits).

The reference twin is the chain itself: persistent_decode_ref below is forward_logits' layer loop
(through the dispatched ops) for the same row.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from ._triton import pow2, tl, triton

STAGES = 5  # per layer; then one merge counter per query head
COLUMNS = tl.constexpr(7)  # address-table columns: input norm, qkv, o, post-attention norm, gate_up, down, the layer's KV
last_launch: dict = {}  # the compiled kernel of the latest launch (benchmarks read its registers)
SPIN_LIMIT = 1 << 21  # polls per program and launch (each ~0.5 us)


@triton.jit
def _load_acquire(ptr, INTERPRET: tl.constexpr):
    if INTERPRET:
        seen = tl.atomic_add(ptr, 0, sem="acquire", scope="gpu")
    else:  # every thread polls (one L2 line): each thread's later loads are then ordered after it
        seen = tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr],
                                         dtype=tl.int32, is_pure=False, pack=1)
    return seen


@triton.jit
def _wait(counter_ptr, target, flag_ptr, budget, INTERPRET: tl.constexpr):
    """Spins until counter >= target; returns the program's remaining budget of polls. A program whose
    budget runs out (a bug, or programs that are not all resident) raises the flag and stops waiting,
    so a broken launch ends in about a second instead of hanging the GPU."""
    seen = _load_acquire(counter_ptr, INTERPRET)
    while (seen < target) & (budget > 0):
        seen = _load_acquire(counter_ptr, INTERPRET)
        budget -= 1
    if seen < target:
        tl.atomic_xchg(flag_ptr, 1)
    tl.debug_barrier()
    return budget


@triton.jit
def _mark(prof_ptr, pid, layer, n_layers, stage: tl.constexpr, slot: tl.constexpr, PROFILE: tl.constexpr):
    """PROFILE: the global timer (ns) at prof[pid, layer, stage, slot]; slot 0 before the stage's wait,
    1 after it, 2 after the program's last tile of the stage (bench/persistent.py --profile reads them)."""
    if PROFILE:
        now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)
        tl.store(prof_ptr + ((pid * n_layers + layer) * 5 + stage) * 3 + slot, now)


@triton.jit
def _arrive(counter_ptr):
    tl.debug_barrier()  # every thread's stores of the tile are issued before the release
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _w_chunk(w_ptr, rows, rows_ok, k0, K: tl.constexpr, BK: tl.constexpr):
    """Columns k0 .. k0 + BK of rows `rows` of the row-major [*, K] matrix at w_ptr (zeros past K)."""
    k = k0 + tl.arange(0, BK)
    return tl.load(w_ptr + rows[:, None] * K + k[None, :], mask=rows_ok[:, None] & (k < K)[None, :], other=0.0)


@triton.jit
def _gemv_fma(w_ptr, rows, rows_ok, w, x_ptr, g_ptr, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              NORM: tl.constexpr, WIDE: tl.constexpr):
    """On the CUDA cores. `w` is the first chunk (_w_chunk at 0), which the caller loads before it waits
    for x; each iteration loads the next chunk before it multiplies this one, so two chunks are in
    flight (in registers). WIDE: accumulate [BN, BK] and reduce once at the end."""
    if WIDE:
        acc = tl.zeros([BN, BK], dtype=tl.float32)
    else:
        acc = tl.zeros([BN], dtype=tl.float32)
    ss = tl.zeros([BK], dtype=tl.float32)
    k = tl.arange(0, BK)
    x = tl.load(x_ptr + k, mask=k < K, other=0.0, cache_modifier=".cg").to(tl.float32)
    for k0 in range(BK, K + BK, BK):  # the last iteration's prefetch lies past K: masked, no traffic
        w_next = _w_chunk(w_ptr, rows, rows_ok, k0, K, BK)
        x_next = tl.load(x_ptr + k0 + k, mask=k0 + k < K, other=0.0, cache_modifier=".cg").to(tl.float32)
        if NORM:
            ss += x * x
            x = x * tl.load(g_ptr + k0 - BK + k, mask=k0 - BK + k < K, other=0.0).to(tl.float32)
        if WIDE:
            acc += w.to(tl.float32) * x[None, :]
        else:
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        w = w_next
        x = x_next
    if WIDE:
        out = tl.sum(acc, axis=1)
    else:
        out = acc
    return out, tl.sum(ss, axis=0)


@triton.jit
def _gemv_dot(w_ptr, rows, rows_ok, x_ptr, g_ptr, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              NORM: tl.constexpr, STAGES: tl.constexpr):
    """On the tensor cores, x padded to 16 rows: Triton pipelines loads that feed tl.dot through shared
    memory (STAGES chunks in flight without holding them in registers)."""
    ss = tl.zeros([BK], dtype=tl.float32)
    k = tl.arange(0, BK)
    pad = tl.arange(0, 16)
    acc = tl.zeros([16, BN], dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        kk = k0 + k
        x = tl.load(x_ptr + kk, mask=kk < K, other=0.0, cache_modifier=".cg").to(tl.float32)
        if NORM:
            ss += x * x
            x = x * tl.load(g_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + rows[:, None] * K + kk[None, :], mask=rows_ok[:, None] & (kk < K)[None, :], other=0.0)
        acc = tl.dot(tl.where(pad[:, None] == 0, x[None, :], 0.0).to(wt.dtype), tl.trans(wt), acc)
    return tl.sum(tl.where(pad[:, None] == 0, acc, 0.0), axis=0), tl.sum(ss, axis=0)


@triton.jit
def _gemv(w_ptr, rows, rows_ok, w, x_ptr, g_ptr, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          NORM: tl.constexpr, WIDE: tl.constexpr):
    """(W[rows] @ x as float32 [BN], sum of x^2) for the row-major [*, K] matrix at w_ptr. With NORM, x
    is scaled by the RMSNorm weight g here and the caller applies 1/rms(x) (from the sum of squares)
    to the result: norm and GEMV in one pass over x, no round trip for the statistics first.
    WIDE: 0/1 the CUDA-core loop (_gemv_fma, per-chunk or final reduction), 2 the tensor cores."""
    if WIDE == 2:
        out, ss = _gemv_dot(w_ptr, rows, rows_ok, x_ptr, g_ptr, K, BN, BK, NORM, 4)
    else:
        out, ss = _gemv_fma(w_ptr, rows, rows_ok, w, x_ptr, g_ptr, K, BN, BK, NORM, WIDE)
    return out, ss


@triton.jit
def _qkv_rows(t, HD: tl.constexpr, PAIRS: tl.constexpr):
    """Tile t's rows of the fused qkv matrix: rows j and HD / 2 + j of one head for PAIRS frequencies
    j, interleaved, so one GEMV covers both halves that RoPE mixes."""
    SUB: tl.constexpr = HD // 2 // PAIRS
    r = tl.arange(0, 2 * PAIRS)
    return (t // SUB) * HD + (r % 2) * (HD // 2) + (t % SUB) * PAIRS + r // 2


@triton.jit
def _qkv_tile(t, w, x_ptr, g_ptr, w_ptr, eps, q_ptr, kv_ptr, c_kv, c_head, pos, cos_ptr, sin_ptr,
              H: tl.constexpr, NQ: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr, PAIRS: tl.constexpr,
              BK: tl.constexpr, WIDE: tl.constexpr):
    """The qkv GEMV of tile t's rows (w: their first chunk), rotated; q to its buffer, k and v into
    the cache at `pos`."""
    HALF: tl.constexpr = HD // 2
    SUB: tl.constexpr = HALF // PAIRS
    head = t // SUB
    rows = _qkv_rows(t, HD, PAIRS)
    acc, ss = _gemv(w_ptr, rows, rows >= 0, w, x_ptr, g_ptr, H, 2 * PAIRS, BK, True, WIDE)
    dtype = q_ptr.dtype.element_ty
    rstd = 1.0 / tl.sqrt(ss / H + eps)
    a, b = tl.split(tl.reshape((acc * rstd).to(dtype).to(tl.float32), [PAIRS, 2]))
    j = (t % SUB) * PAIRS + tl.arange(0, PAIRS)
    if head < NQ + NKV:  # q and k heads rotate
        cos = tl.load(cos_ptr + pos * HALF + j)
        sin = tl.load(sin_ptr + pos * HALF + j)
        a, b = a * cos - b * sin, b * cos + a * sin
    if head < NQ:
        tl.store(q_ptr + head * HD + j, a.to(dtype))
        tl.store(q_ptr + head * HD + HALF + j, b.to(dtype))
    else:
        kv = head - NQ  # keys, then values
        dst = kv_ptr + (kv // NKV) * c_kv + (kv % NKV) * c_head + pos * HD
        tl.store(dst + j, a.to(dtype))
        tl.store(dst + HALF + j, b.to(dtype))


@triton.jit
def _slice(tile, pos, SPLITS: tl.constexpr, MIN_KEYS: tl.constexpr):
    """(head, slice, slices in use, first key, end key) of attention tile `tile`: a head's keys are cut
    into at most SPLITS slices of at least MIN_KEYS (a short context is one slice: no merge)."""
    length = pos + 1
    used = tl.minimum(tl.cdiv(length, MIN_KEYS), SPLITS)
    chunk = tl.cdiv(tl.cdiv(length, used), 16) * 16
    split = tile % SPLITS
    lo = split * chunk
    return tile // SPLITS, split, used, lo, tl.minimum(lo + chunk, length)


@triton.jit
def _kv_block(base, c_kv, n, hi, HD: tl.constexpr):
    d = tl.arange(0, HD)
    ok = (n < hi)[:, None]
    k = tl.load(base + n[:, None] * HD + d[None, :], mask=ok, other=0.0, cache_modifier=".cg")
    v = tl.load(base + c_kv + n[:, None] * HD + d[None, :], mask=ok, other=0.0, cache_modifier=".cg")
    return k, v


@triton.jit
def _attention_tile(tile, k, v, q_ptr, part_ptr, lse_ptr, heads_done_ptr, attn_ptr, kv_ptr, c_kv, c_head, pos,
                    scale_log2, NQ: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr, SPLITS: tl.constexpr,
                    MIN_KEYS: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query head over one slice of the row's keys (online softmax, float32). k, v: the slice's
    first block, loaded before the wait for stage A (the key and value at `pos`, which stage A just
    wrote, are read again here). One slice writes the head's output; several write their output and
    log2-sum-exp to part_ptr/lse_ptr, and the last to finish (an acq_rel counter per head) merges
    them. Returns 1 if this tile completed the head."""
    h, split, used, lo, hi = _slice(tile, pos, SPLITS, MIN_KEYS)
    dtype = attn_ptr.dtype.element_ty
    done = 0
    if split < used:
        d = tl.arange(0, HD)
        base = kv_ptr + (h // (NQ // NKV)) * c_head
        q = tl.load(q_ptr + h * HD + d, cache_modifier=".cg").to(tl.float32)
        k_pos = tl.load(base + pos * HD + d, cache_modifier=".cg")
        v_pos = tl.load(base + c_kv + pos * HD + d, cache_modifier=".cg")
        m_i = -float("inf")
        l_i = 0.0
        acc = tl.zeros([HD], dtype=tl.float32)
        for n0 in range(lo, hi, BLOCK_N):  # the next block is loaded before this one is used
            n = n0 + tl.arange(0, BLOCK_N)
            k_next, v_next = _kv_block(base, c_kv, n + BLOCK_N, hi, HD)
            at_pos = (n == pos)[:, None]
            k = tl.where(at_pos, k_pos[None, :], k)
            v = tl.where(at_pos, v_pos[None, :], v)
            s = tl.where(n < hi, tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            p = tl.exp2(s - m_new)
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p.to(dtype).to(tl.float32)[:, None] * v.to(tl.float32), axis=0)
            m_i = m_new
            k = k_next
            v = v_next
        if used == 1:
            tl.store(attn_ptr + h * HD + d, (acc / l_i).to(dtype))
            done = 1
        else:
            row = h * SPLITS + split
            tl.store(part_ptr + row * HD + d, acc / l_i)
            tl.store(lse_ptr + row, m_i + tl.log2(l_i))
            tl.debug_barrier()
            if tl.atomic_add(heads_done_ptr + h, 1, sem="acq_rel", scope="gpu") == used - 1:
                sp = tl.arange(0, SPLITS)
                lse = tl.load(lse_ptr + h * SPLITS + sp, mask=sp < used, other=float("-inf"), cache_modifier=".cg")
                weight = tl.exp2(lse - tl.max(lse, axis=0))
                parts = tl.load(part_ptr + (h * SPLITS + sp)[:, None] * HD + d[None, :], mask=(sp < used)[:, None],
                                other=0.0, cache_modifier=".cg")
                out = tl.sum(parts * weight[:, None], axis=0) / tl.sum(weight, axis=0)
                tl.store(attn_ptr + h * HD + d, out.to(dtype))
                done = 1
    return done


@triton.jit
def _residual_stage(pid, programs, w_ptr, x_ptr, res_in, res_ptr, wait_ptr, target, arrive_ptr, flag_ptr, budget,
                    prof_ptr, layer, n_layers, STAGE: tl.constexpr, K: tl.constexpr, H: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr, WIDE: tl.constexpr, INTERPRET: tl.constexpr,
                    PROFILE: tl.constexpr):
    """Stages C and E: a projection's rows plus the residual, res[rows] = W[rows] @ x + res_in[rows],
    BN rows a tile, after the stage before has `target` arrivals. Returns the wait budget left."""
    TILES: tl.constexpr = (H + BN - 1) // BN
    if pid < TILES:
        rows = pid * BN + tl.arange(0, BN)
        w = _w_chunk(w_ptr, rows, rows < H, 0, K, BK)
        _mark(prof_ptr, pid, layer, n_layers, STAGE, 0, PROFILE)
        budget = _wait(wait_ptr, target, flag_ptr, budget, INTERPRET)
        _mark(prof_ptr, pid, layer, n_layers, STAGE, 1, PROFILE)
        for t in range(pid, TILES, programs):
            rows = t * BN + tl.arange(0, BN)
            ok = rows < H
            if t != pid:
                w = _w_chunk(w_ptr, rows, ok, 0, K, BK)
            r = tl.load(res_in + rows, mask=ok, other=0.0, cache_modifier=".cg")
            out, _ = _gemv(w_ptr, rows, ok, w, x_ptr, w_ptr, K, BN, BK, False, WIDE)
            tl.store(res_ptr + rows, out.to(res_ptr.dtype.element_ty) + r, mask=ok)
            _arrive(arrive_ptr)
        _mark(prof_ptr, pid, layer, n_layers, STAGE, 2, PROFILE)
    return budget


@triton.jit
def _decode_layers_kernel(hidden_ptr, res_ptr, q_ptr, attn_ptr, h_ptr, part_ptr, lse_ptr, table_ptr, cos_ptr,
                          sin_ptr, slots_ptr, starts_ptr, counters_ptr, flag_ptr, n_layers, eps, scale_log2,
                          c_kv, c_slot, c_head,
                          H: tl.constexpr, NQ: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr, I: tl.constexpr,
                          PAIRS: tl.constexpr, SPLITS: tl.constexpr, BN_O: tl.constexpr, BI: tl.constexpr,
                          BN_D: tl.constexpr, BK_A: tl.constexpr, BK_O: tl.constexpr, BK_G: tl.constexpr,
                          BK_D: tl.constexpr, BLOCK_N: tl.constexpr, MIN_KEYS: tl.constexpr, WIDE: tl.constexpr,
                          INTERPRET: tl.constexpr,
                          LIMIT: tl.constexpr, PROFILE: tl.constexpr, prof_ptr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    dtype = res_ptr.dtype.element_ty
    TILES_A: tl.constexpr = (NQ + 2 * NKV) * (HD // 2 // PAIRS)
    TILES_B: tl.constexpr = NQ * SPLITS
    TILES_C: tl.constexpr = (H + BN_O - 1) // BN_O
    TILES_D: tl.constexpr = (I + BI - 1) // BI
    TILES_E: tl.constexpr = (H + BN_D - 1) // BN_D
    QD: tl.constexpr = NQ * HD
    STAGE_COUNT: tl.constexpr = 5 + NQ  # counters per layer: the stages', then each head's merge
    slot = tl.load(slots_ptr).to(tl.int64)
    pos = tl.load(starts_ptr).to(tl.int64)
    budget = LIMIT
    for layer in range(n_layers):
        row = table_ptr + layer * COLUMNS
        g_in = tl.load(row).to(tl.pointer_type(dtype))
        w_qkv = tl.load(row + 1).to(tl.pointer_type(dtype))
        w_o = tl.load(row + 2).to(tl.pointer_type(dtype))
        g_post = tl.load(row + 3).to(tl.pointer_type(dtype))
        w_gu = tl.load(row + 4).to(tl.pointer_type(dtype))
        w_down = tl.load(row + 5).to(tl.pointer_type(dtype))
        kv_ptr = tl.load(row + 6).to(tl.pointer_type(dtype)) + slot * c_slot  # [2, kv_heads, capacity, HD]
        count = counters_ptr + layer * STAGE_COUNT
        src = res_ptr  # layer 0 reads the embedding as its residual
        if layer == 0:
            src = hidden_ptr
        # Each stage: a program loads its first tile's first weight chunk, then waits for the stage
        # before (so the wait overlaps that load), then runs its tiles.
        # A: norm, qkv, RoPE, KV append
        if pid < TILES_A:
            rows = _qkv_rows(pid, HD, PAIRS)
            w = _w_chunk(w_qkv, rows, rows >= 0, 0, H, BK_A)
            _mark(prof_ptr, pid, layer, n_layers, 0, 0, PROFILE)
            if layer > 0:
                budget = _wait(count - STAGE_COUNT + 4, TILES_E, flag_ptr, budget, INTERPRET)
            _mark(prof_ptr, pid, layer, n_layers, 0, 1, PROFILE)
            for t in range(pid, TILES_A, programs):
                if t != pid:
                    rows = _qkv_rows(t, HD, PAIRS)
                    w = _w_chunk(w_qkv, rows, rows >= 0, 0, H, BK_A)
                _qkv_tile(t, w, src, g_in, w_qkv, eps, q_ptr, kv_ptr, c_kv, c_head, pos, cos_ptr, sin_ptr,
                          H, NQ, NKV, HD, PAIRS, BK_A, WIDE)
                _arrive(count)
            _mark(prof_ptr, pid, layer, n_layers, 0, 2, PROFILE)
        # B: attention, one query head and key slice per tile; the last slice of a head merges it
        if pid < TILES_B:
            h, _, _, lo, hi = _slice(pid, pos, SPLITS, MIN_KEYS)
            k, v = _kv_block(kv_ptr + (h // (NQ // NKV)) * c_head, c_kv, lo + tl.arange(0, BLOCK_N), hi, HD)
            _mark(prof_ptr, pid, layer, n_layers, 1, 0, PROFILE)
            budget = _wait(count, TILES_A, flag_ptr, budget, INTERPRET)
            _mark(prof_ptr, pid, layer, n_layers, 1, 1, PROFILE)
            for t in range(pid, TILES_B, programs):
                if t != pid:
                    h, _, _, lo, hi = _slice(t, pos, SPLITS, MIN_KEYS)
                    k, v = _kv_block(kv_ptr + (h // (NQ // NKV)) * c_head, c_kv, lo + tl.arange(0, BLOCK_N), hi, HD)
                if _attention_tile(t, k, v, q_ptr, part_ptr, lse_ptr, count + 5, attn_ptr, kv_ptr, c_kv, c_head, pos,
                                   scale_log2, NQ, NKV, HD, SPLITS, MIN_KEYS, BLOCK_N):
                    _arrive(count + 1)
            _mark(prof_ptr, pid, layer, n_layers, 1, 2, PROFILE)
        # C: o projection + residual
        budget = _residual_stage(pid, programs, w_o, attn_ptr, src, res_ptr, count + 1, NQ, count + 2, flag_ptr, budget,
                                 prof_ptr, layer, n_layers, 2, QD, H, BN_O, BK_O, WIDE, INTERPRET, PROFILE)
        # D: norm, gate and up (interleaved rows), SiLU(gate) * up
        if pid < TILES_D:
            r = tl.arange(0, 2 * BI)
            idx2 = pid * BI + r // 2
            w = _w_chunk(w_gu, (r % 2) * I + idx2, idx2 < I, 0, H, BK_G)
            _mark(prof_ptr, pid, layer, n_layers, 3, 0, PROFILE)
            budget = _wait(count + 2, TILES_C, flag_ptr, budget, INTERPRET)
            _mark(prof_ptr, pid, layer, n_layers, 3, 1, PROFILE)
            for t in range(pid, TILES_D, programs):
                idx2 = t * BI + r // 2
                if t != pid:
                    w = _w_chunk(w_gu, (r % 2) * I + idx2, idx2 < I, 0, H, BK_G)
                acc, ss = _gemv(w_gu, (r % 2) * I + idx2, idx2 < I, w, res_ptr, g_post, H, 2 * BI, BK_G, True, WIDE)
                rstd = 1.0 / tl.sqrt(ss / H + eps)
                gate, up = tl.split(tl.reshape((acc * rstd).to(dtype), [BI, 2]))
                g32 = gate.to(tl.float32)
                idx = t * BI + tl.arange(0, BI)
                tl.store(h_ptr + idx, (g32 / (1.0 + tl.exp(-g32))).to(dtype) * up, mask=idx < I)
                _arrive(count + 3)
            _mark(prof_ptr, pid, layer, n_layers, 3, 2, PROFILE)
        # E: down projection + residual
        budget = _residual_stage(pid, programs, w_down, h_ptr, res_ptr, res_ptr, count + 3, TILES_D, count + 4, flag_ptr,
                                 budget, prof_ptr, layer, n_layers, 4, I, H, BN_D, BK_D, WIDE, INTERPRET, PROFILE)


class Plan(NamedTuple):
    """What one model's persistent step needs besides the step's inputs: the weight-address table,
    scratch buffers (reused every step), tile sizes and the number of programs."""
    table: torch.Tensor      # [layers, COLUMNS] int64 data pointers
    keep: tuple              # the tensors whose pointers the table holds (kept alive)
    residual: torch.Tensor   # [H] the residual stream; after a step: the last layer's output + residual
    q: torch.Tensor
    attn: torch.Tensor
    h: torch.Tensor
    parts: torch.Tensor      # [NQ * SPLITS, HD] float32: attention slices
    lse: torch.Tensor        # [NQ * SPLITS] float32
    counters: torch.Tensor   # [layers * (STAGES + NQ)] int32, zeroed before each launch
    flag: torch.Tensor       # [1] int32: a wait gave up
    programs: int
    constants: dict
    cache: torch.Tensor      # the KV cache [layers, 2, slots, kv_heads, capacity, head_dim] the table points into
    warps: int = 8


# Keys per attention slice, at least. Each slice is one program's; its first block is loaded before
# the wait for stage A. H100 (bench/persistent.py, 135M shape, 129 keys): one slice of 129 keys per
# head 6.9 us for the stage (three dependent block loads), two slices of 65 keys 6.7 us, slices of 32
# keys (one block each, then the merge) 6.0 us.
MIN_KEYS = 32
CHUNK = 8192  # weight elements per load of a tile (16 KB in fp16); two in flight per program


def _k_block(rows: int, k: int, chunk: int) -> int:
    return max(16, min(pow2(k), chunk // rows))


def _tile_sizes(hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int, programs: int,
                chunk: int = CHUNK) -> dict:
    """Tiles per stage close to (at most) the number of programs, each a power of two in size."""
    half = head_dim // 2
    pairs = half
    while pairs > 1 and (heads + 2 * kv_heads) * (half // pairs) * 2 <= programs:
        pairs //= 2
    splits = 1
    while heads * splits * 2 <= programs and splits < 16:
        splits *= 2
    rows = pow2(triton.cdiv(hidden, programs))
    block_i = pow2(triton.cdiv(inter, programs))
    return dict(PAIRS=pairs, SPLITS=splits, BN_O=rows, BI=block_i, BN_D=rows,
                BK_A=_k_block(2 * pairs, hidden, chunk), BK_O=_k_block(rows, heads * head_dim, chunk),
                BK_G=_k_block(2 * block_i, hidden, chunk), BK_D=_k_block(rows, inter, chunk), BLOCK_N=64,
                MIN_KEYS=MIN_KEYS, WIDE=1)


def supports(cfg, weights, dtype: torch.dtype) -> str | None:
    """None if the persistent step can run this model, else why not."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} (float16/bfloat16 only)"
    checks = {"norm": cfg.norm == "rms", "mlp": cfg.mlp == "gated" and cfg.activation == "silu",
              "positions": cfg.positions == "rope", "qk_norm": not cfg.qk_norm, "embed_scale": cfg.embed_scale == 1.0,
              "sliding windows": not any(cfg.layer_window(i) for i in range(cfg.num_decoder_layers)),
              "rotary": cfg.rotary_dim == cfg.head_dim and cfg.mrope_section is None,
              "head_dim": cfg.head_dim >= 8 and cfg.head_dim & (cfg.head_dim - 1) == 0}
    missing = [name for name, ok in checks.items() if not ok]
    lw = weights.layers[0]
    if lw.qkv_bias is not None or lw.o_bias is not None or lw.attn_out_norm is not None \
            or lw.mlp_out_norm is not None:
        missing.append("biases or sandwich norms")
    if any(not isinstance(w, torch.Tensor) or w.dtype != dtype or not w.is_contiguous()
           for layer in weights.layers for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)):
        missing.append("plain contiguous weights (not quantized)")
    return ", ".join(missing) if missing else None


def make_plan(cfg, weights, cache: torch.Tensor, programs: int | None = None, tile_programs: int | None = None,
              chunk: int = CHUNK) -> Plan:
    """The plan of one engine's weights and KV cache (the runner's cache.data) for `programs` programs
    (default: one per SM; one under the interpreter). tile_programs: cut the stages into tiles as for
    that many programs (tests: many small tiles and attention slices, run by one interpreted program)."""
    device, dtype = cache.device, cache.dtype
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if programs is None:
        programs = 1 if interpret or device.type != "cuda" else \
            torch.cuda.get_device_properties(device).multi_processor_count
    keep = tuple((lw.input_norm, lw.qkv, lw.o_proj, lw.post_norm, lw.gate_up, lw.down) for lw in weights.layers)
    table = torch.tensor([[w.data_ptr() for w in row] + [cache[i].data_ptr()] for i, row in enumerate(keep)],
                         dtype=torch.int64, device=device)
    hidden, inter = cfg.hidden_size, weights.layers[0].down.shape[1]
    empty = lambda n, kind=dtype: torch.zeros(n, dtype=kind, device=device)  # noqa: E731
    sizes = _tile_sizes(hidden, cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim, inter,
                        tile_programs or programs, chunk)
    constants = dict(H=hidden, NQ=cfg.num_attention_heads, NKV=cfg.num_kv_heads, HD=cfg.head_dim, I=inter, **sizes)
    slices = cfg.num_attention_heads * sizes["SPLITS"]
    return Plan(table, keep, empty(hidden), empty(cfg.q_size), empty(cfg.q_size), empty(inter),
                empty((slices, cfg.head_dim), torch.float32), empty(slices, torch.float32),
                empty(len(keep) * (STAGES + cfg.num_attention_heads), torch.int32), empty(1, torch.int32),
                programs, constants, cache)


def expected_counts(plan: Plan) -> list[int]:
    """What each layer's five stage counters (plan.counters.view(layers, -1)[:, :5]) hold after a complete
    launch: one arrival per tile; attention: one per head, by the tile that completed it."""
    c = plan.constants
    per_layer = [(c["NQ"] + 2 * c["NKV"]) * (c["HD"] // 2 // c["PAIRS"]), c["NQ"], triton.cdiv(c["H"], c["BN_O"]),
                 triton.cdiv(c["I"], c["BI"]), triton.cdiv(c["H"], c["BN_D"])]
    return [per_layer] * plan.cache.shape[0]


def stage_counts(plan: Plan) -> list[list[int]]:
    """The five stage counters of each layer after the latest launch (compare with expected_counts)."""
    return plan.counters.view(plan.cache.shape[0], -1)[:, :STAGES].tolist()


def persistent_decode(plan: Plan, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                      starts: torch.Tensor, eps: float, scale: float, profile: torch.Tensor | None = None) -> torch.Tensor:
    """Runs every layer for one row: hidden [H] (the embedding), its cache slot slots[0] and position
    starts[0]; appends the row's keys and values to plan.cache and returns the residual after the
    last layer ([H], plan.residual: the final norm's input). profile: an int64 tensor [programs, layers,
    5, 3] that gets each program's global-timer marks per stage (before its wait, after it, after its
    last tile), for bench/persistent.py --profile."""
    layers = plan.cache.shape[0]
    plan.counters.zero_()
    _, c_kv, c_slot, c_head = plan.cache.stride()[:4]
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    last_launch["kernel"] = _decode_layers_kernel[(plan.programs,)](
        hidden, plan.residual, plan.q, plan.attn, plan.h, plan.parts, plan.lse, plan.table, cos, sin, slots, starts,
        plan.counters, plan.flag, layers, eps, scale * 1.4426950408889634, c_kv, c_slot, c_head,
        **plan.constants, INTERPRET=interpret, LIMIT=SPIN_LIMIT, PROFILE=profile is not None,
        prof_ptr=plan.flag if profile is None else profile, num_warps=plan.warps)
    return plan.residual
