"""Acceptance of a speculative token tree against the target model's own choices.

Per row: tree nodes (tokens, parents, n_nodes as in tree_mask.py; node 0 is the root, the last
accepted token) and `targets[b, i]`, the token the target model picks after node i (argmax, or a
sample drawn with the row's sampling settings). Starting at the root, the walk moves to the child
whose token equals the current node's target, as long as there is one. The accepted nodes form
`path` (path[b, 0] = 0), `count[b]` of them beyond the root; the row's new tokens are the targets
along the path, out[b, i] = targets[b, path[b, i]] for i <= count[b]: the accepted drafts followed by
one token of the target's own (the correction, or the bonus when every draft on the path held).

With a deterministic proposer this is exact speculative sampling: a child with token x is accepted
with probability p(x), a rejected sibling's mass goes to the next sibling, and the emitted token is
a sample of p, so outputs are distributed as plain decoding's (SpecInfer's recursive rejection with
one-hot draft distributions). Children of one node should carry distinct tokens (the first match wins).

Kernel: one program per row, the walk over at most T - 1 levels in registers.
"""

import torch

from ._triton import pow2, tl, triton


@triton.jit
def _accept_kernel(tokens_ptr, parents_ptr, nodes_ptr, targets_ptr, path_ptr, count_ptr, out_ptr, T,
                   BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_T)
    exists = (i > 0) & (i < tl.load(nodes_ptr + b))
    tokens = tl.load(tokens_ptr + b * T + i, mask=exists, other=-1)
    parents = tl.load(parents_ptr + b * T + i, mask=exists, other=-2)
    path = tl.zeros([BLOCK_T], dtype=tl.int32)
    cur = tl.program_id(0) * 0  # int32 scalars, carried through the loop
    count = tl.program_id(0) * 0
    for _ in range(1, T):
        target = tl.load(targets_ptr + b * T + cur)
        match = exists & (parents == cur) & (tokens == target)
        nxt = tl.min(tl.where(match, i, BLOCK_T), axis=0)
        found = nxt < BLOCK_T
        cur = tl.where(found, nxt, cur)
        count += found.to(tl.int32)
        path = tl.where(found & (i == count), nxt, path)
    keep = i <= count
    out = tl.load(targets_ptr + b * T + path, mask=keep, other=0)
    tl.store(path_ptr + b * T + i, path, mask=i < T)
    tl.store(out_ptr + b * T + i, out, mask=i < T)
    tl.store(count_ptr + b, count)


def accept_tree(tokens: torch.Tensor, parents: torch.Tensor, n_nodes: torch.Tensor,
                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(path [B, T] int32, count [B] int32, out [B, T] int64); see the module docstring."""
    batch, t = tokens.shape
    tokens, parents, n_nodes, targets = (x.contiguous() for x in (tokens, parents, n_nodes, targets))
    path = torch.empty(batch, t, dtype=torch.int32, device=tokens.device)
    count = torch.empty(batch, dtype=torch.int32, device=tokens.device)
    out = torch.empty(batch, t, dtype=torch.int64, device=tokens.device)
    _accept_kernel[(batch,)](tokens, parents, n_nodes, targets, path, count, out, t, BLOCK_T=pow2(t), num_warps=1)
    return path, count, out


def accept_tree_ref(tokens: torch.Tensor, parents: torch.Tensor, n_nodes: torch.Tensor,
                    targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The walk, row by row on the host. Entries past count[b] are 0."""
    batch, t = tokens.shape
    path = torch.zeros(batch, t, dtype=torch.int32)
    count = torch.zeros(batch, dtype=torch.int32)
    out = torch.zeros(batch, t, dtype=torch.int64)
    tokens_h, parents_h, nodes_h, targets_h = (x.cpu().tolist() for x in (tokens, parents, n_nodes, targets))
    for b in range(batch):
        cur, walk = 0, [0]
        while True:
            children = [j for j in range(1, nodes_h[b]) if parents_h[b][j] == cur]
            nxt = next((j for j in children if tokens_h[b][j] == targets_h[b][cur]), None)
            if nxt is None:
                break
            cur = nxt
            walk.append(cur)
        count[b] = len(walk) - 1
        path[b, :len(walk)] = torch.tensor(walk, dtype=torch.int32)
        out[b, :len(walk)] = torch.tensor([targets_h[b][j] for j in walk])
    device = tokens.device
    return path.to(device), count.to(device), out.to(device)
