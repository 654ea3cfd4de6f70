"""The verify step's bookkeeping around the model forward (engine/verify.py), one kernel each side.

Before the forward, `tree_inputs` reads what the host wrote for every row in one copy, `packed[b] =
[tokens (T) | parents (T) | n_nodes]` (node 0's token is ignored: the row's last token, `roots[b]`,
takes its place), and makes everything the forward and the acceptance need: the nodes' tokens,
parents and count, the row's cache length `starts[b]` (0 for rows on the scratch slot: padding),
each node's mask bits and depth (tree_mask.py's walk), its RoPE position (start + depth), its RNG
offset for the target's draw (the row's offset + depth + 1, what plain decoding uses at that depth),
and its input embedding. After the acceptance (tree_accept.py: count[b] accepted nodes, the row's new
tokens out[b, :count + 1]), `tree_commit` advances the row: cache length start + count + 1 (not for
padding rows), RNG offset + count + 1, last token out[b, count], and writes the row's result
[out | count] for the host's one read.

Each replaces a dozen small torch ops (copies, index, arithmetic): at the SmolLM2-135M shape a decode
step is launch-bound, and every launch the verify step adds costs about as much as its work.

Kernels: tree_inputs runs one program per (row, node); each walks its row's whole tree (T levels at
most, a few vector loads) and stores its own node's entries, plus that node's embedding row.
tree_commit runs one program per row.
"""

from typing import NamedTuple

import torch

from ._triton import pow2, tl, triton
from .tree_mask import MAX_TREE, tree_mask_ref


class TreeInputs(NamedTuple):
    tokens: torch.Tensor     # [B, T] int64, node 0 = the row's root
    parents: torch.Tensor    # [B, T] int32
    n_nodes: torch.Tensor    # [B] int32
    starts: torch.Tensor     # [B] int32: the row's cache length before the step
    bits: torch.Tensor       # [B, T] int64 (tree_mask.py)
    positions: torch.Tensor  # [B, T] int32: start + depth
    offsets: torch.Tensor    # [B * T] int64: the RNG offset of each node's draw
    embeds: torch.Tensor     # [B, T, hidden] in the embedding table's dtype


@triton.jit
def _tree_inputs_kernel(packed_ptr, roots_ptr, lengths_ptr, slots_ptr, offsets_ptr, embed_ptr,
                        tokens_ptr, parents_ptr, nodes_ptr, starts_ptr, bits_ptr, positions_ptr, node_offsets_ptr,
                        embeds_ptr, T, scratch, hidden, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    node = tl.program_id(1)
    row = packed_ptr + b * (2 * T + 1)
    n = tl.load(row + 2 * T).to(tl.int32)
    slot = tl.load(slots_ptr + b)
    start = tl.load(lengths_ptr + slot) * (slot != scratch).to(tl.int32)
    i = tl.arange(0, BLOCK_T)
    exists = i < n
    in_tree = i < T
    # The whole row's walk (as tree_mask.py): every node climbs one level per iteration.
    parents = tl.load(row + T + i, mask=in_tree, other=-1).to(tl.int32)
    bits = tl.full([BLOCK_T], 1, dtype=tl.int64) << i.to(tl.int64)
    depth = tl.zeros([BLOCK_T], dtype=tl.int32)
    up = tl.where(exists, parents, -1)
    for _ in range(0, T):
        has = up >= 0
        bits = bits | tl.where(has, tl.full([BLOCK_T], 1, dtype=tl.int64) << tl.maximum(up, 0).to(tl.int64), 0)
        depth += has.to(tl.int32)
        up = tl.load(row + T + tl.maximum(up, 0), mask=has, other=-1).to(tl.int32)
    root = tl.load(roots_ptr + b)
    tokens = tl.where(i == 0, root, tl.load(row + i, mask=in_tree, other=0))
    mine = i == node  # this program stores its own node's entries
    out = b * T + i
    tl.store(tokens_ptr + out, tokens, mask=mine)
    tl.store(parents_ptr + out, parents, mask=mine)
    tl.store(bits_ptr + out, bits, mask=mine)
    tl.store(positions_ptr + out, start + depth, mask=mine)
    tl.store(node_offsets_ptr + out, tl.load(offsets_ptr + b) + depth + 1, mask=mine)
    first = i < tl.where(node == 0, 1, 0)  # the row's own entries, once
    tl.store(nodes_ptr + b + i, tl.zeros([BLOCK_T], dtype=tl.int32) + n, mask=first)
    tl.store(starts_ptr + b + i, tl.zeros([BLOCK_T], dtype=tl.int32) + start, mask=first)
    token = tl.sum(tl.where(mine, tokens, 0), axis=0)
    h = tl.arange(0, BLOCK_H)
    dst = embeds_ptr + (b * T + node) * hidden
    for lo in range(0, hidden, BLOCK_H):
        ok = lo + h < hidden
        tl.store(dst + lo + h, tl.load(embed_ptr + token * hidden + lo + h, mask=ok), mask=ok)


def _check_inputs(packed, roots, slots, offsets, embed) -> tuple[int, int]:
    batch, width = packed.shape
    t = (width - 1) // 2
    if width != 2 * t + 1 or not 1 <= t <= MAX_TREE or roots.shape != (batch,) or slots.shape != (batch,) \
            or offsets.shape != (batch,) or embed.dim() != 2 or embed.stride(-1) != 1:
        raise ValueError(f"tree_inputs: packed [B, 2T + 1] (T <= {MAX_TREE}), roots/slots/offsets [B], "
                         f"embed [vocab, hidden]; got packed {tuple(packed.shape)}")
    return batch, t


def tree_inputs(packed: torch.Tensor, roots: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor,
                offsets: torch.Tensor, embed: torch.Tensor, scratch_slot: int) -> TreeInputs:
    """packed [B, 2T + 1] int64; roots [B] int64 (each row's last token); lengths: the KV cache's
    lengths per slot (int32); slots [B] int32; offsets [B] int64 (each row's last RNG offset);
    embed [vocab, hidden]. See the module docstring."""
    batch, t = _check_inputs(packed, roots, slots, offsets, embed)
    device, hidden = packed.device, embed.shape[1]
    result = TreeInputs(torch.empty(batch, t, dtype=torch.int64, device=device),
                        torch.empty(batch, t, dtype=torch.int32, device=device),
                        torch.empty(batch, dtype=torch.int32, device=device),
                        torch.empty(batch, dtype=torch.int32, device=device),
                        torch.empty(batch, t, dtype=torch.int64, device=device),
                        torch.empty(batch, t, dtype=torch.int32, device=device),
                        torch.empty(batch * t, dtype=torch.int64, device=device),
                        torch.empty(batch, t, hidden, dtype=embed.dtype, device=device))
    _tree_inputs_kernel[(batch, t)](packed.contiguous(), roots.contiguous(), lengths, slots.contiguous(),
                                    offsets.contiguous(), embed, *result, t, scratch_slot, hidden,
                                    BLOCK_T=pow2(t), BLOCK_H=min(pow2(hidden), 1024), num_warps=4)
    return result


def tree_inputs_ref(packed: torch.Tensor, roots: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor,
                    offsets: torch.Tensor, embed: torch.Tensor, scratch_slot: int) -> TreeInputs:
    batch, t = _check_inputs(packed, roots, slots, offsets, embed)
    tokens = packed[:, :t].clone()
    tokens[:, 0] = roots
    parents = packed[:, t:2 * t].to(torch.int32)
    n_nodes = packed[:, 2 * t].to(torch.int32)
    starts = torch.where(slots == scratch_slot, 0, lengths[slots.long()]).to(torch.int32)
    bits, depth = tree_mask_ref(parents, n_nodes)
    return TreeInputs(tokens, parents, n_nodes, starts, bits, (starts[:, None] + depth).to(torch.int32),
                      (offsets[:, None] + depth + 1).reshape(-1).to(torch.int64),
                      torch.nn.functional.embedding(tokens, embed))


@triton.jit
def _tree_commit_kernel(count_ptr, out_ptr, starts_ptr, slots_ptr, lengths_ptr, offsets_ptr, last_ptr, result_ptr,
                        T, scratch, BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    count = tl.load(count_ptr + b)
    i = tl.arange(0, BLOCK_T)
    out = tl.load(out_ptr + b * T + i, mask=i < T, other=0)
    tl.store(result_ptr + b * (T + 1) + i, out, mask=i < T)
    tl.store(result_ptr + b * (T + 1) + T, count.to(tl.int64))
    tl.store(last_ptr + b, tl.sum(tl.where(i == count, out, 0), axis=0))
    tl.store(offsets_ptr + b, tl.load(offsets_ptr + b) + count + 1)
    slot = tl.load(slots_ptr + b)
    if slot != scratch:
        tl.store(lengths_ptr + slot, tl.load(starts_ptr + b) + count + 1)


def _check_commit(count, out, result) -> tuple[int, int]:
    batch, t = out.shape
    if count.shape != (batch,) or result.shape[0] < batch or result.shape[1] != t + 1 or not result.is_contiguous():
        raise ValueError(f"tree_commit: count [B], out [B, T], result [>= B, T + 1] contiguous; got out {tuple(out.shape)}")
    return batch, t


def tree_commit(count: torch.Tensor, out: torch.Tensor, starts: torch.Tensor, slots: torch.Tensor,
                lengths: torch.Tensor, offsets: torch.Tensor, last: torch.Tensor, result: torch.Tensor,
                scratch_slot: int) -> None:
    """In place: lengths[slots[b]] = starts[b] + count[b] + 1 (slots other than the scratch one),
    offsets[b] += count[b] + 1, last[b] = out[b, count[b]], result[b] = [out[b] | count[b]]."""
    batch, t = _check_commit(count, out, result)
    _tree_commit_kernel[(batch,)](count.contiguous(), out.contiguous(), starts, slots, lengths, offsets, last, result,
                                  t, scratch_slot, BLOCK_T=pow2(t), num_warps=1)


def tree_commit_ref(count: torch.Tensor, out: torch.Tensor, starts: torch.Tensor, slots: torch.Tensor,
                    lengths: torch.Tensor, offsets: torch.Tensor, last: torch.Tensor, result: torch.Tensor,
                    scratch_slot: int) -> None:
    batch, t = _check_commit(count, out, result)
    real = slots != scratch_slot
    lengths[slots[real].long()] = (starts + count + 1)[real].to(lengths.dtype)
    offsets += (count + 1).to(offsets.dtype)
    last[:batch] = out.gather(1, count[:, None].long())[:, 0]
    result[:batch, :t] = out
    result[:batch, t] = count
