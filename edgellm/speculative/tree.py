"""Draft token trees on the host: branches merged into a trie (the runner's verify step takes each
as its tokens and parents lists, engine/verify.py)."""

from __future__ import annotations


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
