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

STAGES = 5
COLUMNS = tl.constexpr(7)  # address-table columns: input norm, qkv, o, post-attention norm, gate_up, down, the layer's KV
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
def _arrive(counter_ptr):
    tl.debug_barrier()  # every thread's stores of the tile are issued before the release
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _rstd(x_ptr, eps, H: tl.constexpr, HB: tl.constexpr):
    cols = tl.arange(0, HB)
    x = tl.load(x_ptr + cols, mask=cols < H, other=0.0, cache_modifier=".cg").to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)


@triton.jit
def _gemv(w_ptr, rows, rows_ok, x_ptr, rstd, g_ptr, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          NORM: tl.constexpr):
    """float32 [BN]: rows `rows` of the row-major [*, K] matrix at w_ptr times x (x = RMSNorm(x) * g
    with NORM, rounded to x's dtype as the chain's norm kernel rounds it)."""
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < K
        x = tl.load(x_ptr + k, mask=k_ok, other=0.0, cache_modifier=".cg")
        if NORM:
            x = (x.to(tl.float32) * rstd).to(x.dtype) * tl.load(g_ptr + k, mask=k_ok, other=0.0)
        w = tl.load(w_ptr + rows[:, None] * K + k[None, :], mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    return acc


@triton.jit
def _qkv_tile(t, res_ptr, rstd, g_ptr, w_ptr, q_ptr, cache_ptr, kv_base, c_kv, c_head, pos, cos_ptr, sin_ptr,
              H: tl.constexpr, NQ: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr, PAIRS: tl.constexpr,
              BK: tl.constexpr):
    HALF: tl.constexpr = HD // 2
    SUB: tl.constexpr = HALF // PAIRS
    head = t // SUB
    j = (t % SUB) * PAIRS + tl.arange(0, PAIRS)  # this tile's frequencies: rows j and HALF + j of the head
    ok = j < HALF
    dtype = res_ptr.dtype.element_ty
    a = _gemv(w_ptr, head * HD + j, ok, res_ptr, rstd, g_ptr, H, PAIRS, BK, True).to(dtype).to(tl.float32)
    b = _gemv(w_ptr, head * HD + HALF + j, ok, res_ptr, rstd, g_ptr, H, PAIRS, BK, True).to(dtype).to(tl.float32)
    if head < NQ + NKV:  # q and k heads rotate
        cos = tl.load(cos_ptr + pos * HALF + j)
        sin = tl.load(sin_ptr + pos * HALF + j)
        a, b = a * cos - b * sin, b * cos + a * sin
    if head < NQ:
        tl.store(q_ptr + head * HD + j, a.to(dtype))
        tl.store(q_ptr + head * HD + HALF + j, b.to(dtype))
    else:
        kv = head - NQ  # keys, then values
        which = kv // NKV
        dst = cache_ptr + kv_base + which * c_kv + (kv % NKV) * c_head + pos * HD
        tl.store(dst + j, a.to(dtype))
        tl.store(dst + HALF + j, b.to(dtype))


@triton.jit
def _attention_tile(h, q_ptr, attn_ptr, cache_ptr, kv_base, c_kv, c_head, pos, scale_log2,
                    NQ: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr, BLOCK_N: tl.constexpr):
    d = tl.arange(0, HD)
    dtype = attn_ptr.dtype.element_ty
    q = tl.load(q_ptr + h * HD + d, cache_modifier=".cg").to(tl.float32)
    base = cache_ptr + kv_base + (h // (NQ // NKV)) * c_head
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([HD], dtype=tl.float32)
    for n0 in range(0, pos + 1, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        ok = n <= pos
        k = tl.load(base + n[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
        s = tl.where(ok, tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp2(s - m_new)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = tl.load(base + c_kv + n[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
        acc = acc * alpha + tl.sum(p.to(dtype).to(tl.float32)[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new
    tl.store(attn_ptr + h * HD + d, (acc / l_i).to(dtype))


@triton.jit
def _decode_layers_kernel(hidden_ptr, res_ptr, q_ptr, attn_ptr, h_ptr, table_ptr, cos_ptr, sin_ptr,
                          slots_ptr, starts_ptr, counters_ptr, flag_ptr, n_layers, eps, scale_log2,
                          c_kv, c_slot, c_head,
                          H: tl.constexpr, HB: tl.constexpr, NQ: tl.constexpr, NKV: tl.constexpr,
                          HD: tl.constexpr, I: tl.constexpr, PAIRS: tl.constexpr, BN_O: tl.constexpr,
                          BI: tl.constexpr, BN_D: tl.constexpr, BK: tl.constexpr, BLOCK_N: tl.constexpr,
                          INTERPRET: tl.constexpr, LIMIT: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    dtype = res_ptr.dtype.element_ty
    TILES_A: tl.constexpr = (NQ + 2 * NKV) * (HD // 2 // PAIRS)
    TILES_C: tl.constexpr = (H + BN_O - 1) // BN_O
    TILES_D: tl.constexpr = (I + BI - 1) // BI
    TILES_E: tl.constexpr = (H + BN_D - 1) // BN_D
    QD: tl.constexpr = NQ * HD
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
        cache_ptr = tl.load(row + 6).to(tl.pointer_type(dtype))  # this layer's [2, slots, kv_heads, capacity, HD]
        count = counters_ptr + layer * 5
        kv_base = slot * c_slot
        src = res_ptr  # layer 0 reads the embedding as its residual
        if layer == 0:
            src = hidden_ptr
        # A: norm, qkv, RoPE, KV append
        if pid < TILES_A:
            if layer > 0:
                budget = _wait(count - 1, TILES_E, flag_ptr, budget, INTERPRET)
            rstd = _rstd(src, eps, H, HB)
            for t in range(pid, TILES_A, programs):
                _qkv_tile(t, src, rstd, g_in, w_qkv, q_ptr, cache_ptr, kv_base, c_kv, c_head, pos, cos_ptr,
                          sin_ptr, H, NQ, NKV, HD, PAIRS, BK)
                _arrive(count)
        # B: attention, one query head per tile
        if pid < NQ:
            budget = _wait(count, TILES_A, flag_ptr, budget, INTERPRET)
            for h in range(pid, NQ, programs):
                _attention_tile(h, q_ptr, attn_ptr, cache_ptr, kv_base, c_kv, c_head, pos, scale_log2,
                                NQ, NKV, HD, BLOCK_N)
                _arrive(count + 1)
        # C: o projection + residual
        if pid < TILES_C:
            budget = _wait(count + 1, NQ, flag_ptr, budget, INTERPRET)
            for t in range(pid, TILES_C, programs):
                rows = t * BN_O + tl.arange(0, BN_O)
                ok = rows < H
                o = _gemv(w_o, rows, ok, attn_ptr, 0.0, w_o, QD, BN_O, BK, False).to(dtype)
                r = tl.load(src + rows, mask=ok, other=0.0, cache_modifier=".cg")
                tl.store(res_ptr + rows, o + r, mask=ok)
                _arrive(count + 2)
        # D: norm, gate and up, SiLU(gate) * up
        if pid < TILES_D:
            budget = _wait(count + 2, TILES_C, flag_ptr, budget, INTERPRET)
            rstd = _rstd(res_ptr, eps, H, HB)
            for t in range(pid, TILES_D, programs):
                idx = t * BI + tl.arange(0, BI)
                ok = idx < I
                gate = _gemv(w_gu, idx, ok, res_ptr, rstd, g_post, H, BI, BK, True).to(dtype)
                up = _gemv(w_gu, I + idx, ok, res_ptr, rstd, g_post, H, BI, BK, True).to(dtype)
                g32 = gate.to(tl.float32)
                tl.store(h_ptr + idx, (g32 / (1.0 + tl.exp(-g32))).to(dtype) * up, mask=ok)
                _arrive(count + 3)
        # E: down projection + residual
        if pid < TILES_E:
            budget = _wait(count + 3, TILES_D, flag_ptr, budget, INTERPRET)
            for t in range(pid, TILES_E, programs):
                rows = t * BN_D + tl.arange(0, BN_D)
                ok = rows < H
                down = _gemv(w_down, rows, ok, h_ptr, 0.0, w_down, I, BN_D, BK, False).to(dtype)
                r = tl.load(res_ptr + rows, mask=ok, other=0.0, cache_modifier=".cg")
                tl.store(res_ptr + rows, down + r, mask=ok)
                _arrive(count + 4)


class Plan(NamedTuple):
    """What one model's persistent step needs besides the step's inputs: the weight-address table,
    scratch buffers (reused every step), tile sizes and the number of programs."""
    table: torch.Tensor      # [layers, COLUMNS] int64 data pointers
    keep: tuple              # the tensors whose pointers the table holds (kept alive)
    residual: torch.Tensor   # [H] the residual stream; after a step: the last layer's output + residual
    q: torch.Tensor
    attn: torch.Tensor
    h: torch.Tensor
    counters: torch.Tensor   # [layers * STAGES] int32
    flag: torch.Tensor       # [1] int32: a wait gave up
    programs: int
    constants: dict
    cache: torch.Tensor      # the KV cache [layers, 2, slots, kv_heads, capacity, head_dim] the table points into
    warps: int = 8


def _tile_sizes(hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int, programs: int) -> dict:
    """Tiles per stage close to the number of programs, each a power of two in size."""
    half = head_dim // 2
    pairs = half
    while pairs > 1 and (heads + 2 * kv_heads) * (half // pairs) * 2 <= programs:
        pairs //= 2
    rows = pow2(triton.cdiv(hidden, programs))
    return dict(PAIRS=pairs, BN_O=rows, BN_D=rows, BI=pow2(triton.cdiv(inter, programs)),
                BK=max(64, min(1024, 8192 // rows)), BLOCK_N=64)


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


def make_plan(cfg, weights, cache: torch.Tensor, programs: int | None = None) -> Plan:
    """The plan of one engine's weights and KV cache (the runner's cache.data) for `programs` programs
    (default: one per SM; one under the interpreter)."""
    device, dtype = cache.device, cache.dtype
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if programs is None:
        programs = 1 if interpret or device.type != "cuda" else \
            torch.cuda.get_device_properties(device).multi_processor_count
    keep = tuple((lw.input_norm, lw.qkv, lw.o_proj, lw.post_norm, lw.gate_up, lw.down) for lw in weights.layers)
    table = torch.tensor([[w.data_ptr() for w in row] + [cache[i].data_ptr()] for i, row in enumerate(keep)],
                         dtype=torch.int64, device=device)
    hidden, inter = cfg.hidden_size, weights.layers[0].down.shape[1]
    empty = lambda n: torch.zeros(n, dtype=dtype, device=device)  # noqa: E731
    constants = dict(H=hidden, HB=pow2(hidden), NQ=cfg.num_attention_heads, NKV=cfg.num_kv_heads,
                     HD=cfg.head_dim, I=inter,
                     **_tile_sizes(hidden, cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim, inter, programs))
    return Plan(table, keep, empty(hidden), empty(cfg.q_size), empty(cfg.q_size), empty(inter),
                torch.zeros(len(keep) * STAGES, dtype=torch.int32, device=device),
                torch.zeros(1, dtype=torch.int32, device=device), programs, constants, cache)


def expected_counts(plan: Plan) -> list[int]:
    """What plan.counters hold after a complete launch: each stage's tile count, layer after layer."""
    c = plan.constants
    per_layer = [(c["NQ"] + 2 * c["NKV"]) * (c["HD"] // 2 // c["PAIRS"]), c["NQ"], triton.cdiv(c["H"], c["BN_O"]),
                 triton.cdiv(c["I"], c["BI"]), triton.cdiv(c["H"], c["BN_D"])]
    return per_layer * plan.cache.shape[0]


def persistent_decode(plan: Plan, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                      starts: torch.Tensor, eps: float, scale: float) -> torch.Tensor:
    """Runs every layer for one row: hidden [H] (the embedding), its cache slot slots[0] and position
    starts[0]; appends the row's keys and values to plan.cache and returns the residual after the
    last layer ([H], plan.residual: the final norm's input)."""
    layers = plan.cache.shape[0]
    plan.counters.zero_()
    _, c_kv, c_slot, c_head = plan.cache.stride()[:4]
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    _decode_layers_kernel[(plan.programs,)](
        hidden, plan.residual, plan.q, plan.attn, plan.h, plan.table, cos, sin, slots, starts,
        plan.counters, plan.flag, layers, eps, scale * 1.4426950408889634, c_kv, c_slot, c_head,
        **plan.constants, INTERPRET=interpret, LIMIT=SPIN_LIMIT, num_warps=plan.warps)
    return plan.residual
