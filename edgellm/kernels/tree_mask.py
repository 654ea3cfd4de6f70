"""A speculative token tree's attention mask and positions, from its parent array.

A tree of T nodes per row: node 0 is the root (the last accepted token), every other node's parent
comes before it (parents[b, i] < i, parents[b, 0] = -1), and only the first n_nodes[b] nodes exist.
Node i may attend to the context, its ancestors and itself: bit j of bits[b, i] (int64, so T <= 64)
is set for each such node j of the tree. Its RoPE position is the row's length plus its depth
(the root has depth 0), which a chain (parents = i - 1) makes the usual consecutive positions.

On the device the walk is part of the verify step's input kernel (tree_step.py tree_inputs);
`tree_mask_ref` here is its reference, and the bit conversions serve the seeds' mask-in API.
"""

import torch

MAX_TREE = 64  # nodes per row: the mask of a node is one int64


def tree_mask_ref(parents: torch.Tensor, n_nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Node by node: a node's mask is its parent's plus itself, its depth its parent's plus one.
    Nodes past n_nodes[b] get only their own bit and depth 0."""
    batch, t = parents.shape
    bits = torch.zeros(batch, t, dtype=torch.int64)
    depth = torch.zeros(batch, t, dtype=torch.int32)
    parents_host, nodes_host = parents.cpu(), n_nodes.cpu()
    for b in range(batch):
        masks = []  # as unsigned Python ints; stored as int64 (bit 63 is the sign bit)
        for i in range(t):
            parent = int(parents_host[b, i]) if i < int(nodes_host[b]) else -1
            masks.append((1 << i) | (masks[parent] if parent >= 0 else 0))
            bits[b, i] = masks[i] - (1 << 64) if masks[i] >> 63 else masks[i]
            depth[b, i] = int(depth[b, parent]) + 1 if parent >= 0 else 0
    return bits.to(parents.device), depth.to(parents.device)


def bits_to_mask(bits: torch.Tensor) -> torch.Tensor:
    """[B, T] int64 masks -> [B, T, T] bool (row i, column j: node i sees node j)."""
    t = bits.shape[-1]
    return ((bits[..., :, None] >> torch.arange(t, device=bits.device)) & 1).bool()


def mask_to_bits(mask: torch.Tensor) -> torch.Tensor:
    """[B, T, T] bool/int masks -> [B, T] int64 (the inverse of bits_to_mask)."""
    t = mask.shape[-1]
    if t > MAX_TREE:
        raise ValueError(f"tree masks of at most {MAX_TREE} nodes, got {t}")
    weights = torch.ones(t, dtype=torch.int64, device=mask.device) << torch.arange(t, device=mask.device)
    return (mask.to(torch.int64) * weights).sum(-1)
