"""Draft token trees on the host: branches merged into a trie, and a batch of trees packed into the
arrays the runner's verify step takes (engine/verify.py)."""

from __future__ import annotations

import torch


class DraftTree:
    """Node 0 is the root (the row's last token, not a draft); node i > 0 holds tokens[i] after
    parents[i]. Siblings hold distinct tokens; nodes are in the order they were added (parents first)."""

    def __init__(self):
        self.tokens: list[int] = [0]
        self.parents: list[int] = [-1]
        self._children: list[dict[int, int]] = [{}]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def drafts(self) -> int:
        return len(self.tokens) - 1

    def add_branch(self, tokens, limit: int) -> None:
        """Add a continuation of the root, sharing the prefix it has in common with earlier ones;
        stop once the tree has `limit` drafts."""
        node = 0
        for token in tokens:
            child = self._children[node].get(token)
            if child is None:
                if self.drafts >= limit:
                    return
                child = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(node)
                self._children.append({})
                self._children[node][token] = child
            node = child


def pack_trees(trees: list[DraftTree | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [n, T], parents [n, T], n_nodes [n]) for the verify step; a row without a tree is a
    bare root (it advances by one token, as in a plain step)."""
    width = max(len(t) if t is not None else 1 for t in trees)
    tokens = torch.zeros(len(trees), width, dtype=torch.int64)
    parents = torch.full((len(trees), width), -1, dtype=torch.int32)
    n_nodes = torch.ones(len(trees), dtype=torch.int32)
    for row, tree in enumerate(trees):
        if tree is not None:
            n = len(tree)
            tokens[row, :n] = torch.tensor(tree.tokens)
            parents[row, :n] = torch.tensor(tree.parents, dtype=torch.int32)
            n_nodes[row] = n
    return tokens, parents, n_nodes
