"""Causal GQA attention over the linear KV cache: prefill (many queries per row) and decode (one).

Prefill kernel: flash attention, one program per (row, query head, block of queries), online
softmax in float32 over key blocks up to the causal limit, keys/values read straight from the row's
cache slot (so a chunk may follow an earlier prefix: chunked prefill and prefix reuse need nothing
else). The key blocks wholly before a query block's first query run without masks, the diagonal's
blocks masked; the softmax scale rides exp2's argument (one FMA an element); the last query blocks
(the longest under the causal mask) start first; long chunks take 128-row tiles whose rows pack a
KV group's query heads, so each K/V tile is loaded once per group.
head_dim that is not a power of two (48, 96, ...) is padded to the next one with masks.
Speculative token trees have their own split-K kernel (tree_attention.py); the reference here
takes their masks too.

Decode kernel: split-K ("flash decoding"). Phase 1: one program per (row, KV head, split) loads
each key/value block once for all query heads of its group and writes a partial result and its
log-sum-exp; phase 2 merges the splits. Split ranges come from each row's length on the device,
so the launch needs no host synchronisation (CUDA-graph safe).
"""

import torch

from ._triton import dot_precision, pdl_release, pdl_wait, pow2, tl, triton, use_pdl
from .dispatch import run_settings
from .lora import fused_shrink_args, lora_shrink_ref, shrink_finish, shrink_tile

_LOG2E = 1.4426950408889634


@triton.jit
def online_softmax_start(ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The running (acc, max, sum) of an online softmax over ROWS query rows, before any key."""
    return (tl.zeros([ROWS, BLOCK_D], dtype=tl.float32), tl.full([ROWS], float("-inf"), dtype=tl.float32),
            tl.zeros([ROWS], dtype=tl.float32))


@triton.jit
def online_softmax_step(acc, m_i, l_i, qk, v_ptrs, v_mask, PRECISION: tl.constexpr, EMPTY_ROWS: tl.constexpr):
    """One key block of an online softmax in base 2: qk [M, N] the block's scores already scaled by
    scale * log2(e) (-inf where a row may not see a key), the block's values loaded from v_ptrs [N, D]
    (v_mask), folded into the running (acc [M, D], max m_i [M], sum l_i [M]). EMPTY_ROWS: a row may
    have seen no key yet (its max stays -inf and its shift 0). Returns the new (acc, m_i, l_i)."""
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    shift = m_new
    if EMPTY_ROWS:
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - shift[:, None])
    alpha = tl.exp2(m_i - shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptrs, mask=v_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_range(acc, m_i, l_i, q, kc_ptr, vc_ptr, kv_base, c_pos, d, d_ok, lo, hi, key_end, q_pos, scale_log2,
                   window, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
                   WINDOWED: tl.constexpr, EMPTY_ROWS: tl.constexpr):
    """Online softmax of the rows `q` over key blocks lo, lo + BLOCK_N, ... < hi. MASKED: blocks on
    or past the diagonal (or under a window), masked per query; otherwise every row sees every key
    of every block (blocks wholly before the block's first query), so no mask is built. EMPTY_ROWS:
    a row may see no key of a masked block yet (a window's start, a packed block's later queries, a
    split's share past a row's position): its running max stays -inf and its shift 0. Scores stay
    unscaled; the scale (with log2(e)) is folded into exp2's argument, one FMA an element."""
    for n0 in range(lo, hi, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            key_ok = n_offs < key_end
        k_mask = d_ok[:, None]
        if MASKED:
            k_mask = k_mask & key_ok[None, :]
        k = tl.load(kc_ptr + kv_base + n_offs[None, :] * c_pos + d[:, None], mask=k_mask, other=0.0)
        qk = tl.dot(q, k, input_precision=PRECISION)
        if MASKED:
            allowed = key_ok[None, :] & (n_offs[None, :] <= q_pos[:, None])
            if WINDOWED:
                allowed = allowed & (n_offs[None, :] > q_pos[:, None] - window)
            qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale_log2)
        shift = m_new
        if MASKED and EMPTY_ROWS:
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk * scale_log2 - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_mask = d_ok[None, :]
        if MASKED:
            v_mask = v_mask & key_ok[:, None]
        v = tl.load(vc_ptr + kv_base + n_offs[:, None] * c_pos + d[None, :], mask=v_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, slots_ptr, starts_ptr, qlens_ptr,
                    s_qb, s_qs, s_qh, s_ob, s_os, s_oh, c_slot, c_head, c_pos,
                    scale_log2, group, head_dim, window, part_out_ptr, part_lse_ptr, seq, n_heads,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr, WINDOWED: tl.constexpr, SPLITS: tl.constexpr, PACK: tl.constexpr):
    # Rows of a program: BLOCK_M // PACK queries x PACK query heads of one KV group (PACK = 1: one
    # head, program axis 1 the query head; PACK = the group: axis 1 the KV head, each key block
    # loaded once for the whole group, as decode does). Query blocks run last block first: under the
    # causal mask the last blocks walk the most keys, and starting them first keeps the tail short.
    b = tl.program_id(0)
    unit = tl.program_id(1)
    m_block = tl.num_programs(2) // SPLITS - 1 - tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS
    QUERIES: tl.constexpr = BLOCK_M // PACK
    r = tl.arange(0, BLOCK_M)
    m_offs = m_block * QUERIES + r // PACK
    h_row = unit * PACK + r % PACK
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q_len = tl.load(qlens_ptr + b)
    if m_block * QUERIES >= q_len:  # a block of padding queries: zeros (split: one split says 0, the rest nothing)
        ok = (m_offs < seq)[:, None] & d_ok[None, :]
        if SPLITS == 1:
            tl.store(out_ptr + b.to(tl.int64) * s_ob + m_offs[:, None] * s_os + h_row[:, None] * s_oh + d[None, :],
                     tl.zeros([BLOCK_M, BLOCK_D], out_ptr.dtype.element_ty), mask=ok)
        else:
            part_row = ((b * seq + m_offs).to(tl.int64) * n_heads + h_row) * SPLITS + split
            tl.store(part_lse_ptr + part_row,
                     tl.zeros([BLOCK_M], tl.float32) + tl.where(split == 0, 0.0, float("-inf")), mask=m_offs < seq)
            tl.store(part_out_ptr + part_row[:, None] * head_dim + d[None, :], tl.zeros([BLOCK_M, BLOCK_D], tl.float32),
                     mask=ok)
    if m_block * QUERIES < q_len:
        start = tl.load(starts_ptr + b)
        slot = tl.load(slots_ptr + b).to(tl.int64)
        row_ok = m_offs < q_len
        q = tl.load(q_ptr + b.to(tl.int64) * s_qb + m_offs[:, None] * s_qs + h_row[:, None] * s_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        q_pos = start + m_offs
        kv_base = slot * c_slot + ((unit * PACK) // group).to(tl.int64) * c_head
        acc, m_i, l_i = online_softmax_start(BLOCK_M, BLOCK_D)
        first_query = start + m_block * QUERIES
        key_end = start + tl.minimum((m_block + 1) * QUERIES, q_len)
        key_start = 0
        if WINDOWED:  # query p sees keys p - window + 1 .. p: start at the block's first query's window
            key_start = tl.maximum(first_query - window + 1, 0) // BLOCK_N * BLOCK_N
        key_stop = key_end
        if SPLITS > 1:  # this program's share of the key blocks (split-K over a long context)
            per_split = tl.cdiv(tl.cdiv(key_end - key_start, BLOCK_N), SPLITS) * BLOCK_N
            key_start = key_start + split * per_split
            key_stop = tl.minimum(key_start + per_split, key_end)
        # Key blocks wholly at or before the block's first query are seen by all its rows: no mask
        # (a window's lower edge moves with each query, so windowed rows take the masked loop only).
        diagonal = key_start
        if not WINDOWED:
            diagonal = tl.maximum(tl.minimum((first_query + 1) // BLOCK_N * BLOCK_N, key_stop), key_start)
        acc, m_i, l_i = _prefill_range(acc, m_i, l_i, q, kc_ptr, vc_ptr, kv_base, c_pos, d, d_ok, key_start, diagonal,
                                       key_end, q_pos, scale_log2, window, BLOCK_N, PRECISION, False, WINDOWED,
                                       False)
        acc, m_i, l_i = _prefill_range(acc, m_i, l_i, q, kc_ptr, vc_ptr, kv_base, c_pos, d, d_ok, diagonal, key_stop,
                                       key_end, q_pos, scale_log2, window, BLOCK_N, PRECISION, True, WINDOWED,
                                       WINDOWED or PACK > 1 or SPLITS > 1)
        if SPLITS == 1:  # (padding queries: zeros)
            out = tl.where(row_ok[:, None], acc / tl.where(row_ok, l_i, 1.0)[:, None], 0.0)
            tl.store(out_ptr + b.to(tl.int64) * s_ob + m_offs[:, None] * s_os + h_row[:, None] * s_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=(m_offs < seq)[:, None] & d_ok[None, :])
        else:  # a partial result and its log2-sum-exp, merged by _decode_merge_kernel
            seen = l_i > 0
            part = tl.where(row_ok[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
            lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
            lse = tl.where(row_ok, lse, tl.where(split == 0, 0.0, float("-inf")))  # padding: 0 from split 0
            part_row = ((b * seq + m_offs).to(tl.int64) * n_heads + h_row) * SPLITS + split
            tl.store(part_lse_ptr + part_row, lse, mask=m_offs < seq)
            tl.store(part_out_ptr + part_row[:, None] * head_dim + d[None, :], part,
                     mask=(m_offs < seq)[:, None] & d_ok[None, :])


def no_window(window: int) -> int:
    """The kernels' window argument: the window, or for none (0) one wider than any cache."""
    return window if window > 0 else 1 << 30


def _check_cache(q_heads, head_dim, k_cache, v_cache):
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("attention: k_cache and v_cache must have the same shape and strides, last dim contiguous")
    if k_cache.shape[-1] != head_dim or q_heads % k_cache.shape[1]:
        raise ValueError(f"attention: {q_heads} query heads of dim {head_dim} do not fit cache {tuple(k_cache.shape)}")


# A chunk whose rows see at most this many keys (a short prompt's prefill, nothing cached before it)
# walks them in one program per query block: split-K's merge kernel costs more than it saves there
# (H100: a 48-token prompt's attention 4.3 + 2.4 us a layer split 9-30 ways by the
# cache's capacity).
PREFILL_SPLIT_MIN_KEYS = 256


# Chunks of more queries than this take 128-row tiles, their rows packing a KV group's query heads.
LONG_PREFILL_QUERIES = 1024


def _prefill_tile(block_d: int, long_chunk: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) from H100 sweeps (bench/prefill_attention.py): 64 x 64 tiles
    with 4 warps up to 1024 queries, 128 x 64 with 8 warps (two warpgroups
    of 64 rows) past it; four stages of K/V in flight for head_dim 64, three for 128 (shared memory)."""
    return (128 if long_chunk else 64, 64, 8 if long_chunk else 4, 4 if block_d <= 64 else 3)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                      starts: torch.Tensor, q_lens: torch.Tensor, scale: float, window: int = 0, *,
                      tile: tuple[int, int, int, int] | None = None, num_splits: int | None = None,
                      max_keys: int | None = None, pack: bool | None = None) -> torch.Tensor:
    """window > 0: a sliding window (each query sees its last `window` keys, itself included).
    tile = (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the default tiling (benchmarks);
    num_splits the number of key ranges each query block is split into (default: enough programs to
    fill the GPU, 1 when the query blocks alone do or when no row sees over PREFILL_SPLIT_MIN_KEYS keys).
    max_keys: at most how many keys a row sees (starts + q_lens), if the caller knows (default: the
    cache's capacity); it only sizes the split. pack: a program's rows are queries x every query head
    of a KV group (BLOCK_M // group queries), each key block loaded once per group; default: where
    the keys are split (a short chunk after a long cached prefix) and for chunks of over
    LONG_PREFILL_QUERIES queries."""
    batch, seq, heads, head_dim = q.shape
    _check_cache(heads, head_dim, k_cache, v_cache)
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(batch, seq, heads, head_dim, dtype=q.dtype, device=q.device)  # (the kernels zero the padding)
    block_d = pow2(head_dim, 16)
    group = heads // k_cache.shape[1]
    keys = k_cache.shape[2] if max_keys is None else min(max_keys, k_cache.shape[2])
    long_chunk = seq > LONG_PREFILL_QUERIES
    invariant = run_settings().batch_invariant  # one tile for every chunk, keys unsplit: a query's sums
    if invariant:  # then follow its own position only (key blocks from 0), whatever chunk it is in
        tile, num_splits, pack = tile or _prefill_tile(block_d, False), 1, False
    if pack is None:
        pack = long_chunk or (num_splits != 1 and keys > PREFILL_SPLIT_MIN_KEYS)
    pack_rows = group if pack and group > 1 and group & (group - 1) == 0 else 1
    if tile is None:
        tile = _prefill_tile(block_d, long_chunk)
    block_m, block_n, warps, stages = tile
    if not invariant:  # (short chunks: smaller tiles)
        block_m = max(min(block_m, pow2(seq * pack_rows, 16)), pack_rows)
    q_blocks = triton.cdiv(seq, block_m // pack_rows)
    # Few query blocks (a short chunk, perhaps after a long cached prefix) leave most SMs idle while
    # each program walks every key: split the keys then, as decode does, and merge the parts. Not
    # once the query blocks alone fill the SMs (a 512-token prompt split in two with its merge took
    # 23.7 us on the H100 against 9.1 unsplit).
    programs = batch * q_blocks * (heads // pack_rows)
    splits = num_splits if num_splits is not None else \
        1 if not q.is_cuda or keys <= PREFILL_SPLIT_MIN_KEYS or programs >= _sm_count(q) else \
        _num_splits(q, batch * q_blocks, heads // pack_rows, keys)
    part_out = part_lse = out
    if splits > 1:
        part_out = torch.empty(batch * seq * heads * splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch * seq * heads * splits, dtype=torch.float32, device=q.device)
    _prefill_kernel[(batch, heads // pack_rows, q_blocks * splits)](
        q, k_cache, v_cache, out, slots, starts, q_lens, q.stride(0), q.stride(1), q.stride(2),
        out.stride(0), out.stride(1), out.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        scale * _LOG2E, group, head_dim, window, part_out, part_lse, seq, heads,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=dot_precision(q.dtype), WINDOWED=window > 0,
        SPLITS=splits, PACK=pack_rows, num_warps=warps, num_stages=stages)
    if splits > 1:
        rows = out.view(batch * seq, heads, head_dim)
        t, lora_args, constants = fused_shrink_args(None, batch * seq, heads * head_dim, heads, block_d, rows)
        _decode_merge_kernel[(batch * seq, heads)](part_out, part_lse, rows, rows.stride(0), rows.stride(1), heads,
                                                   splits, head_dim, *lora_args, BLOCK_S=pow2(splits),
                                                   BLOCK_D=block_d, HAS_LORA=False, **constants, PDL=False)
    return out


@triton.jit
def _attend_split(q, k_ptr, v_ptr, c_pos, d, d_ok, lo, hi, scale_log2, start, bits, context_lo,
                  BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                  TREE: tl.constexpr):
    """Split-K attention of BLOCK_Q query rows `q` over keys lo .. hi - 1 at k_ptr / v_ptr (one KV
    head of one slot): (out [BLOCK_Q, BLOCK_D], log2-sum-exp [BLOCK_Q]) of the split, for the merge.
    TREE (tree_attention.py): keys from `start` on are a token tree, row r sees key start + j only
    where bit j of bits[r] is set, and context keys from context_lo[r] on (its sliding window), so a
    row may see no key of a block."""
    acc, m_i, l_i = online_softmax_start(BLOCK_Q, BLOCK_D)
    for n0 in range(lo, hi, BLOCK_N):
        n_offs = n0 + tl.arange(0, BLOCK_N)
        key_ok = n_offs < hi
        k = tl.load(k_ptr + n_offs[None, :] * c_pos + d[:, None], mask=key_ok[None, :] & d_ok[:, None], other=0.0)
        qk = tl.dot(q, k, input_precision=PRECISION) * scale_log2
        if TREE:
            rel = n_offs - start  # < 0: the context; 0 .. nodes - 1: the tree
            seen = (bits[:, None] >> tl.minimum(tl.maximum(rel, 0), 63).to(tl.int64)[None, :]) & 1
            context = (rel[None, :] < 0) & (n_offs[None, :] >= context_lo[:, None])
            qk = tl.where(key_ok[None, :] & (context | ((rel[None, :] >= 0) & (seen != 0))), qk, float("-inf"))
        else:
            qk = tl.where(key_ok[None, :], qk, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, qk, v_ptr + n_offs[:, None] * c_pos + d[None, :],
                                            key_ok[:, None] & d_ok[None, :], PRECISION, TREE)
    has_keys = l_i > 0
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def _decode_split_kernel(q_ptr, kc_ptr, vc_ptr, part_out_ptr, part_lse_ptr, slots_ptr, lens_ptr,
                         s_qb, s_qh, c_slot, c_head, c_pos, scale_log2, group, head_dim, n_heads, n_splits, window,
                         BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         PRECISION: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lens_ptr + b)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    first = tl.maximum(length - window, 0)  # a sliding window reads its last `window` keys only
    split_len = tl.cdiv(tl.cdiv(length - first, n_splits), BLOCK_N) * BLOCK_N
    lo = first + split * split_len
    hi = tl.minimum(lo + split_len, length)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < group
    d_ok = d < head_dim
    heads = kv_head * group + g
    q = tl.load(q_ptr + b.to(tl.int64) * s_qb + heads[:, None] * s_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    kv_base = slot * c_slot + kv_head.to(tl.int64) * c_head
    out, lse = _attend_split(q, kc_ptr + kv_base, vc_ptr + kv_base, c_pos, d, d_ok, lo, hi, scale_log2, 0, 0, 0,
                             BLOCK_G, BLOCK_N, BLOCK_D, PRECISION, False)
    row = (b * n_heads + heads).to(tl.int64) * n_splits + split
    pdl_release(PDL)
    # A split past the row's keys (the split count follows the cache's capacity, the keys the row's
    # length) writes only its -inf log-sum-exp: the merge reads no part whose lse is -inf.
    tl.store(part_out_ptr + row[:, None] * head_dim + d[None, :], out, mask=(g_ok & (g * 0 + lo < hi))[:, None] & d_ok[None, :])
    tl.store(part_lse_ptr + row, lse, mask=g_ok)


@triton.jit
def _decode_merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, s_ob, s_oh, n_heads, n_splits, head_dim,
                         a_ptr, idx_ptr, t_ptr, gr, s_as, s_ar, s_tsplit, s_tm,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_R: tl.constexpr,
                         PDL: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    if HAS_LORA:  # the o projection's LoRA shrink over this head's columns (split h of its K)
        adapter = tl.load(idx_ptr + b)
        a_tile = shrink_tile(a_ptr, adapter, h * head_dim + d, d < head_dim, gr, s_as, s_ar, BLOCK_R)  # see shrink_tile
    pdl_wait(PDL)
    row = (b * n_heads + h).to(tl.int64) * n_splits + s
    lse = tl.load(part_lse_ptr + row, mask=s < n_splits, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, axis=0))
    # Parts without keys (lse -inf: weight 0) are not read: a runtime sized for long prompts splits
    # into up to 64 parts, of which a short context fills a few.
    part = tl.load(part_out_ptr + row[:, None] * head_dim + d[None, :],
                   mask=(s[:, None] < n_splits) & (lse > float("-inf"))[:, None] & (d[None, :] < head_dim), other=0.0)
    out = (tl.sum(part * weight[:, None], axis=0) / tl.sum(weight, axis=0)).to(out_ptr.dtype.element_ty)
    if HAS_LORA:
        shrink_finish(a_tile, out, h * head_dim + d, d < head_dim, a_ptr, adapter, gr, s_as, s_ar,
                      t_ptr + h * s_tsplit + b * s_tm, BLOCK_R)
    pdl_release(PDL)
    tl.store(out_ptr + b.to(tl.int64) * s_ob + h * s_oh + d, out, mask=d < head_dim)


def _sm_count(q: torch.Tensor) -> int:
    return torch.cuda.get_device_properties(q.device).multi_processor_count


def _num_splits(q: torch.Tensor, batch: int, kv_heads: int, capacity: int) -> int:
    """Enough programs to fill the GPU (about two per SM), never more splits than key blocks. One
    off the GPU: the interpreter runs programs one after another, so a split is only extra work
    (the kernel tests choose their splits). RunSettings.batch_invariant: as many as one row would
    take, whatever the batch (a row's split boundaries, and so its sums, follow its length alone)."""
    if not q.is_cuda:
        return 1
    if run_settings().batch_invariant:
        batch = 1
    return max(1, min(triton.cdiv(2 * _sm_count(q), batch * kv_heads), triton.cdiv(capacity, 64), 64))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, scale: float, window: int = 0, num_splits: int | None = None, *,
                     lora_a=None):
    """window > 0: a sliding window (the query sees the last `window` keys only; only they are read,
    split across the programs as a whole cache would be). lora_a=(a_stack, index, used): also the o
    projection's LoRA shrink of the output (kernels/lora.py), fused into the merge, one K split per
    head: returns (out, [heads, batch, G*R] partials)."""
    batch, heads, head_dim = q.shape
    _check_cache(heads, head_dim, k_cache, v_cache)
    if q.stride(-1) != 1:
        q = q.contiguous()
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    splits = num_splits or _num_splits(q, batch, kv_heads, min(k_cache.shape[2], window or k_cache.shape[2]))
    part_out = torch.empty(batch * heads * splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch * heads * splits, dtype=torch.float32, device=q.device)
    block_d = pow2(head_dim, 16)
    pdl = use_pdl(q)
    _decode_split_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, part_out, part_lse, slots, lengths, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), scale * _LOG2E, group, head_dim, heads, splits,
        no_window(window), BLOCK_G=pow2(group, 16), BLOCK_N=64, BLOCK_D=block_d, PRECISION=dot_precision(q.dtype), PDL=pdl, num_warps=4,
        launch_pdl=pdl > 0)
    out = torch.empty(batch, heads, head_dim, dtype=q.dtype, device=q.device)
    t, lora_args, constants = fused_shrink_args(lora_a, batch, heads * head_dim, heads, block_d, out)
    _decode_merge_kernel[(batch, heads)](part_out, part_lse, out, out.stride(0), out.stride(1), heads, splits,
                                         head_dim, *lora_args, BLOCK_S=pow2(splits), BLOCK_D=block_d,
                                         HAS_LORA=lora_a is not None, **constants, PDL=pdl, launch_pdl=pdl > 0)
    return out if lora_a is None else (out, t)


def _row_attention(q, keys, values, first_position: int, scale: float, tree: torch.Tensor | None = None,
                   window: int = 0):
    """q: [S, Hq, D]; keys/values: [Hkv, L, D] with L = first_position + S. Causal, float32 math;
    with `tree` ([S, S] bool), query i sees the chunk's keys j where tree[i, j] instead; window > 0:
    query i (at first_position + i, or first_position + its depth in a tree) sees only its last
    `window` positions."""
    s, hq, _ = q.shape
    hkv, length, _ = keys.shape
    group = hq // hkv
    keys = keys.float().repeat_interleave(group, dim=0)
    values = values.float().repeat_interleave(group, dim=0)
    scores = torch.einsum("shd,hld->hsl", q.float(), keys) * scale
    query_pos = first_position + torch.arange(s, device=q.device)
    key_pos = torch.arange(length, device=q.device)
    hidden = key_pos[None, :] > query_pos[:, None]
    if tree is not None:
        hidden = torch.cat([hidden[:, :first_position], ~tree], dim=1)
        query_pos = first_position + tree.sum(-1) - 1  # a node's position once accepted: its depth on
    if window > 0:
        hidden = hidden | (key_pos[None, :] <= query_pos[:, None] - window)
    scores = scores.masked_fill(hidden[None], float("-inf"))
    return torch.einsum("hsl,hld->shd", scores.softmax(-1), values)


def prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slots: torch.Tensor, starts: torch.Tensor, q_lens: torch.Tensor,
                          scale: float, window: int = 0, tree_bits: torch.Tensor | None = None, *,
                          max_keys: int | None = None) -> torch.Tensor:
    """q: [B, S, Hq, D], right-padded; row b has q_lens[b] real queries at positions starts[b]...
    (max_keys: the kernel's split-sizing hint; no effect here)

    Row b's query i attends to keys 0 .. starts[b] + i of cache slot slots[b] (its keys for this
    chunk must already be appended); window > 0: only to its last `window` of them. With tree_bits
    ([B, S] int64, tree_mask.py), query i attends to keys 0 .. starts[b] - 1 (within the window of
    its depth) and to the chunk's key j where bit j of tree_bits[b, i] is set.
    Returns [B, S, Hq, D] in q's dtype; padded queries give 0.
    """
    from .tree_mask import bits_to_mask

    out = torch.zeros_like(q)
    trees = bits_to_mask(tree_bits) if tree_bits is not None else None
    for b, (slot, start, n) in enumerate(zip(slots.tolist(), starts.tolist(), q_lens.tolist())):
        keys = k_cache[slot, :, :start + n]
        values = v_cache[slot, :, :start + n]
        tree = trees[b, :n, :n] if trees is not None else None
        out[b, :n] = _row_attention(q[b, :n], keys, values, start, scale, tree, window).to(q.dtype)
    return out


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slots: torch.Tensor, lengths: torch.Tensor, scale: float, window: int = 0,
                         num_splits: int | None = None, *, lora_a=None):
    """q: [B, Hq, D], one query per row at position lengths[b] - 1 (its key already appended);
    attends to keys 0 .. lengths[b] - 1 of slot slots[b] (window > 0: the last `window` of them).
    Returns [B, Hq, D] in q's dtype.

    Written over the cache with a length mask (no per-row host loop): on CUDA over its whole capacity,
    so that it has static shapes and needs no host sync (torch.compile captures it: the compiled
    baseline); on the CPU, where reading the lengths costs nothing, over the longest row's keys only.
    num_splits is the kernel's tuning knob (ignored); with lora_a also lora_shrink_ref of the output
    rows (as [B, Hq * D])."""
    batch, heads, head_dim = q.shape
    if not q.is_cuda:
        k_cache, v_cache = (c[:, :, :int(lengths.max())] for c in (k_cache, v_cache))
    keys, values = k_cache[slots.long()].float(), v_cache[slots.long()].float()  # [B, Hkv, L, D]
    kv_heads, capacity = keys.shape[1], keys.shape[2]
    grouped = q.float().reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = torch.einsum("bhgd,bhld->bhgl", grouped, keys) * scale
    key_pos = torch.arange(capacity, device=q.device)[None, :]
    valid = (key_pos < lengths.long()[:, None]) & (key_pos >= lengths.long()[:, None] - no_window(window))
    probs = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(dim=-1)
    out = torch.einsum("bhgl,bhld->bhgd", probs, values).reshape(batch, heads, head_dim).to(q.dtype)
    return out if lora_a is None else (out, lora_shrink_ref(out.reshape(batch, -1), *lora_a))
