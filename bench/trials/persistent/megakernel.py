"""A persistent decode kernel: every decoder layer of a batch-1 decode step in one launch (issue 18).

Why: the kernel chain pays 1.3-4 us of launch, ramp-up and drain per kernel even inside a CUDA
graph, and a step is 356 kernels at the Llama-3.2-1B shape, 636 at SmolLM2-135M's; at batch 1 most
of those kernels read a few kB to a few hundred kB, far too little to hide that.

Structure: one program per SM loops over a static list of tiles. Each layer is five stages, each cut
into tiles that programs take round-robin:
  A  qkv: a slice of the fused qkv GEMV over the RMSNorm'd residual (every tile reads the whole
     residual from L2 and takes the norm's statistics in the same pass), RoPE, and the key/value
     written into the KV cache at the row's position;
  B  attention: one query head over a slice of the row's keys (online softmax in float32); a head
     cut into several slices is merged by its last slice to finish (a counter per head);
  C  o: a slice of the o-projection GEMV plus the residual add for its rows;
  D  gate_up: RMSNorm again, a slice of the gate and up GEMVs, SiLU(gate) * up;
  E  down: a slice of the down GEMV plus the residual add.
Instead of kernel boundaries, stage s of layer l waits until a counter in global memory says every
tile of the stage before it is done (ld.acquire in a spin loop), and each tile increments its own
stage's counter after a CTA barrier (atom.release). Stages form one chain, so every buffer's readers
have finished before it is written again. The counters are zeroed before each launch; a wait gives
up after SPIN_LIMIT polls and raises a flag (kernels/grid_sync.py) (a bug then shows as a wrong answer, not a hung GPU).

Numerics follow the chain (model.forward_logits with the Triton ops): float32 accumulation, the
activations rounded to the model dtype where the chain rounds them (qkv, RoPE, attention output,
each projection, the residual sums, SiLU), except the RMSNorm output, which is not rounded (its
1/rms scales the GEMV's float32 sum). The sums run in another order, so results agree to rounding,
not bit for bit (H100: relative logit error <= 5e-3; greedy answers of the real default model equal). Under the interpreter the programs run one after another, so the
interpreter runs one program (which then never waits).

persistent_decode_ref is the same step in torch, op by op with the same roundings; the tests also
compare the whole step with the kernel chain (model.forward_logits).
"""

from __future__ import annotations

import torch

from edgellm.kernels._triton import tl, triton
from grid_sync import arrive, mark, wait_count
from megakernel_plan import STAGES, Plan, expected_counts, make_plan, stage_counts, supports

__all__ = ["STAGES", "Plan", "expected_counts", "make_plan", "persistent_decode", "persistent_decode_ref",
           "stage_counts", "supports"]

COLUMNS = tl.constexpr(7)  # address-table columns: input norm, qkv, o, post-attention norm, gate_up, down, the layer's KV
last_launch: dict = {}  # the compiled kernel of the latest launch (benchmarks read its registers)
SPIN_LIMIT = 1 << 21  # polls per program and launch (each ~0.5 us)


@triton.jit
def _w_chunk(w_ptr, rows, rows_ok, k0, K: tl.constexpr, BK: tl.constexpr):
    """Columns k0 .. k0 + BK of rows `rows` of the row-major [*, K] matrix at w_ptr (zeros past K)."""
    k = k0 + tl.arange(0, BK)
    return tl.load(w_ptr + rows[:, None] * K + k[None, :], mask=rows_ok[:, None] & (k < K)[None, :], other=0.0)


@triton.jit
def _gemv(w_ptr, rows, rows_ok, w, x_ptr, g_ptr, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          NORM: tl.constexpr):
    """(W[rows] @ x as float32 [BN], sum of x^2) for the row-major [*, K] matrix at w_ptr, on the CUDA
    cores. `w` is the first chunk (_w_chunk at 0), which the caller loads before it waits for x; each
    iteration loads the next chunk before it multiplies this one, so two chunks are in flight (in
    registers: Triton pipelines only loads that feed tl.dot). Products accumulate in [BN, BK], reduced
    once at the end. With NORM, x is scaled by the RMSNorm weight g here and the caller applies
    1/rms(x) (from the sum of squares) to the result: norm and GEMV in one pass over x.
    Measured slower on the H100 (bench/RESULTS.md) and removed: reducing each chunk, and tl.dot with
    x padded to 16 rows."""
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    ss = tl.zeros([BK], dtype=tl.float32)
    k = tl.arange(0, BK)
    x = tl.load(x_ptr + k, mask=k < K, other=0.0, cache_modifier=".cg").to(tl.float32)
    for k0 in range(BK, K + BK, BK):  # the last iteration's prefetch lies past K: masked, no traffic
        w_next = _w_chunk(w_ptr, rows, rows_ok, k0, K, BK)
        x_next = tl.load(x_ptr + k0 + k, mask=k0 + k < K, other=0.0, cache_modifier=".cg").to(tl.float32)
        if NORM:
            ss += x * x
            x = x * tl.load(g_ptr + k0 - BK + k, mask=k0 - BK + k < K, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        w = w_next
        x = x_next
    return tl.sum(acc, axis=1), tl.sum(ss, axis=0)


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
              BK: tl.constexpr):
    """The qkv GEMV of tile t's rows (w: their first chunk), rotated; q to its buffer, k and v into
    the cache at `pos`."""
    HALF: tl.constexpr = HD // 2
    SUB: tl.constexpr = HALF // PAIRS
    head = t // SUB
    rows = _qkv_rows(t, HD, PAIRS)
    acc, ss = _gemv(w_ptr, rows, rows >= 0, w, x_ptr, g_ptr, H, 2 * PAIRS, BK, True)
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
                    BN: tl.constexpr, BK: tl.constexpr, INTERPRET: tl.constexpr,
                    PROFILE: tl.constexpr):
    """Stages C and E: a projection's rows plus the residual, res[rows] = W[rows] @ x + res_in[rows],
    BN rows a tile, after the stage before has `target` arrivals. Returns the wait budget left."""
    TILES: tl.constexpr = (H + BN - 1) // BN
    if pid < TILES:
        rows = pid * BN + tl.arange(0, BN)
        w = _w_chunk(w_ptr, rows, rows < H, 0, K, BK)
        mark(prof_ptr, pid, layer, n_layers, STAGE, 0, PROFILE)
        budget = wait_count(wait_ptr, target, flag_ptr, budget, INTERPRET)
        mark(prof_ptr, pid, layer, n_layers, STAGE, 1, PROFILE)
        for t in range(pid, TILES, programs):
            rows = t * BN + tl.arange(0, BN)
            ok = rows < H
            if t != pid:
                w = _w_chunk(w_ptr, rows, ok, 0, K, BK)
            r = tl.load(res_in + rows, mask=ok, other=0.0, cache_modifier=".cg")
            out, _ = _gemv(w_ptr, rows, ok, w, x_ptr, w_ptr, K, BN, BK, False)
            tl.store(res_ptr + rows, out.to(res_ptr.dtype.element_ty) + r, mask=ok)
            arrive(arrive_ptr)
        mark(prof_ptr, pid, layer, n_layers, STAGE, 2, PROFILE)
    return budget


@triton.jit
def _decode_layers_kernel(hidden_ptr, res_ptr, q_ptr, attn_ptr, h_ptr, part_ptr, lse_ptr, table_ptr, cos_ptr,
                          sin_ptr, slots_ptr, starts_ptr, counters_ptr, flag_ptr, n_layers, eps, scale_log2,
                          c_kv, c_slot, c_head,
                          H: tl.constexpr, NQ: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr, I: tl.constexpr,
                          PAIRS: tl.constexpr, SPLITS: tl.constexpr, BN_O: tl.constexpr, BI: tl.constexpr,
                          BN_D: tl.constexpr, BK_A: tl.constexpr, BK_O: tl.constexpr, BK_G: tl.constexpr,
                          BK_D: tl.constexpr, BLOCK_N: tl.constexpr, MIN_KEYS: tl.constexpr,
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
            mark(prof_ptr, pid, layer, n_layers, 0, 0, PROFILE)
            if layer > 0:
                budget = wait_count(count - STAGE_COUNT + 4, TILES_E, flag_ptr, budget, INTERPRET)
            mark(prof_ptr, pid, layer, n_layers, 0, 1, PROFILE)
            for t in range(pid, TILES_A, programs):
                if t != pid:
                    rows = _qkv_rows(t, HD, PAIRS)
                    w = _w_chunk(w_qkv, rows, rows >= 0, 0, H, BK_A)
                _qkv_tile(t, w, src, g_in, w_qkv, eps, q_ptr, kv_ptr, c_kv, c_head, pos, cos_ptr, sin_ptr,
                          H, NQ, NKV, HD, PAIRS, BK_A)
                arrive(count)
            mark(prof_ptr, pid, layer, n_layers, 0, 2, PROFILE)
        # B: attention, one query head and key slice per tile; the last slice of a head merges it
        if pid < TILES_B:
            h, _, _, lo, hi = _slice(pid, pos, SPLITS, MIN_KEYS)
            k, v = _kv_block(kv_ptr + (h // (NQ // NKV)) * c_head, c_kv, lo + tl.arange(0, BLOCK_N), hi, HD)
            mark(prof_ptr, pid, layer, n_layers, 1, 0, PROFILE)
            budget = wait_count(count, TILES_A, flag_ptr, budget, INTERPRET)
            mark(prof_ptr, pid, layer, n_layers, 1, 1, PROFILE)
            for t in range(pid, TILES_B, programs):
                if t != pid:
                    h, _, _, lo, hi = _slice(t, pos, SPLITS, MIN_KEYS)
                    k, v = _kv_block(kv_ptr + (h // (NQ // NKV)) * c_head, c_kv, lo + tl.arange(0, BLOCK_N), hi, HD)
                if _attention_tile(t, k, v, q_ptr, part_ptr, lse_ptr, count + 5, attn_ptr, kv_ptr, c_kv, c_head, pos,
                                   scale_log2, NQ, NKV, HD, SPLITS, MIN_KEYS, BLOCK_N):
                    arrive(count + 1)
            mark(prof_ptr, pid, layer, n_layers, 1, 2, PROFILE)
        # C: o projection + residual
        budget = _residual_stage(pid, programs, w_o, attn_ptr, src, res_ptr, count + 1, NQ, count + 2, flag_ptr, budget,
                                 prof_ptr, layer, n_layers, 2, QD, H, BN_O, BK_O, INTERPRET, PROFILE)
        # D: norm, gate and up (interleaved rows), SiLU(gate) * up
        if pid < TILES_D:
            r = tl.arange(0, 2 * BI)
            idx2 = pid * BI + r // 2
            w = _w_chunk(w_gu, (r % 2) * I + idx2, idx2 < I, 0, H, BK_G)
            mark(prof_ptr, pid, layer, n_layers, 3, 0, PROFILE)
            budget = wait_count(count + 2, TILES_C, flag_ptr, budget, INTERPRET)
            mark(prof_ptr, pid, layer, n_layers, 3, 1, PROFILE)
            for t in range(pid, TILES_D, programs):
                idx2 = t * BI + r // 2
                if t != pid:
                    w = _w_chunk(w_gu, (r % 2) * I + idx2, idx2 < I, 0, H, BK_G)
                acc, ss = _gemv(w_gu, (r % 2) * I + idx2, idx2 < I, w, res_ptr, g_post, H, 2 * BI, BK_G, True)
                rstd = 1.0 / tl.sqrt(ss / H + eps)
                gate, up = tl.split(tl.reshape((acc * rstd).to(dtype), [BI, 2]))
                g32 = gate.to(tl.float32)
                idx = t * BI + tl.arange(0, BI)
                tl.store(h_ptr + idx, (g32 / (1.0 + tl.exp(-g32))).to(dtype) * up, mask=idx < I)
                arrive(count + 3)
            mark(prof_ptr, pid, layer, n_layers, 3, 2, PROFILE)
        # E: down projection + residual
        budget = _residual_stage(pid, programs, w_down, h_ptr, res_ptr, res_ptr, count + 3, TILES_D, count + 4, flag_ptr,
                                 budget, prof_ptr, layer, n_layers, 4, I, H, BN_D, BK_D, INTERPRET, PROFILE)


def persistent_decode(plan: Plan, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                      starts: torch.Tensor, eps: float, scale: float, profile: torch.Tensor | None = None) -> torch.Tensor:
    """Runs every layer for one row: hidden [H] (the embedding), its cache slot slots[0] and position
    starts[0]; appends the row's keys and values to plan.cache and returns the residual after the
    last layer ([H], plan.residual: the final norm's input). profile: an int64 tensor [programs, layers,
    5, 3] that gets each program's global-timer marks per stage (before its wait, after it, after its
    last tile), for bench/persistent.py's stage profile."""
    layers = plan.cache.shape[0]
    plan.counters.zero_()
    _, c_kv, c_slot, c_head = plan.cache.stride()[:4]
    last_launch["kernel"] = _decode_layers_kernel[(plan.programs,)](
        hidden, plan.residual, plan.q, plan.attn, plan.h, plan.parts, plan.lse, plan.table, cos, sin, slots, starts,
        plan.counters, plan.flag, layers, eps, scale * 1.4426950408889634, c_kv, c_slot, c_head,
        **plan.constants, LIMIT=SPIN_LIMIT, PROFILE=profile is not None,
        prof_ptr=plan.flag if profile is None else profile, num_warps=plan.warps)
    return plan.residual


def persistent_decode_ref(plan: Plan, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                          starts: torch.Tensor, eps: float, scale: float, profile=None) -> torch.Tensor:
    """persistent_decode in torch: the same layers, roundings to the model dtype where the kernel
    rounds, float32 sums; writes plan.cache and returns the residual after the last layer."""
    c = plan.constants
    nq, nkv, hd, inter = c["NQ"], c["NKV"], c["HD"], c["I"]
    slot, pos = int(slots[0]), int(starts[0])
    dtype = hidden.dtype
    half = hd // 2

    def norm_linear(x, g, w):  # RMSNorm(x) * g @ w^T, the statistics in float32
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean() + eps)
        return (w.float() @ (x32 * g.float())) * rstd

    def rotate(x):  # [heads, hd], HF rotate-half RoPE at `pos`
        x1, x2 = x[:, :half].float(), x[:, half:].float()
        cs, sn = cos[pos].float(), sin[pos].float()
        return torch.cat((x1 * cs - x2 * sn, x2 * cs + x1 * sn), dim=-1).to(dtype)

    res = hidden.clone()
    for layer, (g_in, w_qkv, w_o, g_post, w_gu, w_down) in enumerate(plan.keep):
        qkv = norm_linear(res, g_in, w_qkv).to(dtype)
        q, k, v = qkv.split([nq * hd, nkv * hd, nkv * hd])
        q, k = rotate(q.view(nq, hd)), rotate(k.view(nkv, hd))
        plan.cache[layer, 0, slot, :, pos] = k
        plan.cache[layer, 1, slot, :, pos] = v.view(nkv, hd)
        keys = plan.cache[layer, 0, slot, :, :pos + 1].float().repeat_interleave(nq // nkv, dim=0)
        values = plan.cache[layer, 1, slot, :, :pos + 1].float().repeat_interleave(nq // nkv, dim=0)
        p = torch.softmax((keys @ q.float()[:, :, None])[..., 0] * scale, dim=-1)
        attn = (p.to(dtype).float()[:, None, :] @ values)[:, 0].to(dtype).reshape(-1)
        res = (w_o.float() @ attn.float()).to(dtype) + res
        gate, up = norm_linear(res, g_post, w_gu).to(dtype).split([inter, inter])
        h = torch.nn.functional.silu(gate.float()).to(dtype) * up
        res = (w_down.float() @ h.float()).to(dtype) + res
    return res
