"""Attention of a speculative token tree over the linear KV cache (engine/verify.py).

Each row brings T tree nodes (tree_mask.py), already appended at cache positions starts[b] ..
starts[b] + T - 1. Node i attends to the row's context (positions before starts[b]) and to the tree
nodes j whose bit j bits[b, i] has (its ancestors and itself).

A tree is a handful of queries over a long context, like a decode step and unlike a prefill chunk,
so the kernel is the decode kernel's split-K (attention.py): one program per (row, KV head, split of
the keys) loads each key/value block once for every node and every query head of its group (T x
group query rows in one tl.dot), then attention.py's merge combines the splits. Nodes past
n_nodes[b] see only the root (their outputs are never used; this keeps them finite).
"""

import torch

from ._triton import dot_precision, pdl_release, pdl_wait, pow2, tl, triton, use_pdl
from .attention import _LOG2E, _attend_split, _check_cache, _decode_merge_kernel, _num_splits, no_window, prefill_attention_ref


@triton.jit
def _tree_split_kernel(q_ptr, kc_ptr, vc_ptr, bits_ptr, part_out_ptr, part_lse_ptr, slots_ptr, starts_ptr, nodes_ptr,
                       s_qb, s_qt, s_qh, c_slot, c_head, c_pos, scale_log2, group, head_dim, n_heads, n_splits, T,
                       window, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                       PDL: tl.constexpr):
    pdl_wait(PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    start = tl.load(starts_ptr + b)
    n_nodes = tl.load(nodes_ptr + b)
    length = start + n_nodes
    slot = tl.load(slots_ptr + b).to(tl.int64)
    first = tl.maximum(start + 1 - window, 0)  # the root's window; deeper nodes see less (context_lo)
    split_len = tl.cdiv(tl.cdiv(length - first, n_splits), BLOCK_N) * BLOCK_N
    lo = first + split * split_len
    hi = tl.minimum(lo + split_len, length)
    r = tl.arange(0, BLOCK_Q)  # query row = node * group + head in the group
    node = r // group
    g = r % group
    r_ok = node < T
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    heads = kv_head * group + g
    q = tl.load(q_ptr + b.to(tl.int64) * s_qb + node[:, None] * s_qt + heads[:, None] * s_qh + d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    bits = tl.load(bits_ptr + b.to(tl.int64) * T + node, mask=r_ok, other=1)
    bits = tl.where(node < n_nodes, bits, 1)
    depth = tl.zeros([BLOCK_Q], dtype=tl.int32)  # ancestors: the bits other than the node's own
    for j in range(1, T):
        depth += ((bits >> j) & 1).to(tl.int32)
    context_lo = start + depth + 1 - window  # its sliding window, at the position it takes once accepted
    kv_base = slot * c_slot + kv_head.to(tl.int64) * c_head
    out, lse = _attend_split(q, kc_ptr + kv_base, vc_ptr + kv_base, c_pos, d, d_ok, lo, hi, scale_log2, start, bits,
                             context_lo, BLOCK_Q, BLOCK_N, BLOCK_D, PRECISION, True)
    row = ((b * T + node) * n_heads + heads).to(tl.int64) * n_splits + split
    ok = r_ok & (g < group)
    pdl_release(PDL)
    tl.store(part_out_ptr + row[:, None] * head_dim + d[None, :], out, mask=ok[:, None] & d_ok[None, :])
    tl.store(part_lse_ptr + row, lse, mask=ok)


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                   starts: torch.Tensor, n_nodes: torch.Tensor, bits: torch.Tensor, scale: float,
                   window: int = 0, num_splits: int | None = None) -> torch.Tensor:
    """q: [B, T, Hq, D]; bits: [B, T] int64 (tree_mask.py). window > 0: a sliding window, each node's
    measured from the position it would take once accepted (the row's length plus its depth); it
    must exceed T, so that a node always sees all its ancestors. num_splits: key ranges per row and
    KV head (default as decode_attention's). Returns [B, T, Hq, D] in q's dtype."""
    batch, t, heads, head_dim = q.shape
    _check_cache(heads, head_dim, k_cache, v_cache)
    if bits.shape != (batch, t) or t > 64:
        raise ValueError(f"tree_attention: bits must be [{batch}, {t}] with T <= 64")
    if 0 < window <= t:
        raise ValueError(f"tree_attention: a sliding window ({window}) must be longer than the tree ({t} nodes)")
    if q.stride(-1) != 1:
        q = q.contiguous()
    bits = bits.contiguous()
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    splits = num_splits or _num_splits(q, batch, kv_heads, min(k_cache.shape[2], window or k_cache.shape[2]))
    part_out = torch.empty(batch * t * heads * splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch * t * heads * splits, dtype=torch.float32, device=q.device)
    block_d = pow2(head_dim, 16)
    pdl = use_pdl(q)
    _tree_split_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, bits, part_out, part_lse, slots, starts, n_nodes, q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), scale * _LOG2E, group, head_dim, heads, splits, t,
        no_window(window), BLOCK_Q=pow2(t * group, 16), BLOCK_N=64, BLOCK_D=block_d, PRECISION=dot_precision(q.dtype), PDL=pdl, num_warps=4,
        launch_pdl=pdl > 0)
    out = torch.empty(batch, t, heads, head_dim, dtype=q.dtype, device=q.device)
    _decode_merge_kernel[(batch * t, heads)](  # the tree's nodes are the merge's rows
        part_out, part_lse, out, heads * head_dim, head_dim, heads, splits, head_dim,
        out, out, out, 0, 0, 0, 0, 0, BLOCK_S=pow2(splits), BLOCK_D=block_d, HAS_LORA=False, BLOCK_R=16, PDL=pdl,
        launch_pdl=pdl > 0)
    return out


def tree_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                       starts: torch.Tensor, n_nodes: torch.Tensor, bits: torch.Tensor, scale: float,
                       window: int = 0, num_splits: int | None = None) -> torch.Tensor:
    """prefill_attention_ref with the tree's masks; nodes past n_nodes[b] give 0 (num_splits: the
    kernel's knob, no effect here)."""
    return prefill_attention_ref(q, k_cache, v_cache, slots, starts, n_nodes, scale, window, tree_bits=bits)
