"""N-gram prompt lookup (seed 003): propose what followed the last few tokens where they occurred
before, in the prompt or in the text generated so far. No draft model.

Per row, an index maps each n-gram (n = 1 .. window) to the positions where it ended, the most
recent last, updated as tokens arrive (O(window) per token), so a lookup costs a few dict reads
whatever the length of the text. The longest n-gram that occurred before wins; its most recent
occurrences give up to `branches` distinct continuations of up to `candidates` tokens each, merged
into one tree. A continuation that reaches the end of the text repeats its period (text that loops
keeps looping).
"""

from __future__ import annotations

from .tree import DraftTree

_KEEP = 8  # most recent occurrences kept per n-gram


class NgramIndex:
    def __init__(self, window: int):
        self.window = window
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], list[int]] = {}

    def extend(self, tokens) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens)
            for n in range(1, min(self.window, end) + 1):
                seen = self.ends.setdefault(tuple(self.tokens[end - n:end]), [])
                seen.append(end)
                if len(seen) > _KEEP:
                    del seen[0]

    def continuations(self, candidates: int, branches: int) -> list[list[int]]:
        """Up to `branches` distinct continuations (by first token) of the longest n-gram that ends
        the text and occurred before, most recent first."""
        end = len(self.tokens)
        for n in range(min(self.window, end - 1), 0, -1):
            found, firsts = [], set()
            for stop in reversed(self.ends.get(tuple(self.tokens[end - n:]), ())):
                if stop < end and self.tokens[stop] not in firsts:
                    firsts.add(self.tokens[stop])
                    found.append(self._copy(stop, candidates))
                    if len(found) == branches:
                        break
            if found:
                return found
        return []

    def _copy(self, stop: int, candidates: int) -> list[int]:
        """What followed position `stop`, `candidates` tokens. A copy that runs into the end of the text
        overlaps itself (the text repeats with period end - stop, as in a loop or a repeated line):
        it goes on repeating that period rather than stopping short."""
        period = len(self.tokens) - stop
        if period >= candidates:
            return self.tokens[stop:stop + candidates]
        return [self.tokens[stop + j % period] for j in range(candidates)]


class NgramProposer:
    """Rows are named by a key (a request's row index, or on the engine loop the row's KV slot)."""

    def __init__(self, window: int, candidates: int, branches: int):
        self.window, self.candidates, self.branches = window, candidates, branches
        self.rows: dict[int, NgramIndex] = {}

    def begin(self, prompts: list[list[int]]) -> None:
        """Rows 0 .. n-1 start from these prompts; every other row is forgotten."""
        self.rows = {}
        for row, prompt in enumerate(prompts):
            self.begin_row(row, prompt)

    def begin_row(self, row: int, prompt: list[int]) -> None:
        index = NgramIndex(self.window)
        index.extend(prompt)
        self.rows[row] = index

    def end_row(self, row: int) -> None:
        self.rows.pop(row, None)

    def extend(self, row: int, tokens: list[int]) -> None:
        self.rows[row].extend(tokens)

    def propose(self, rows: list[int], limits: list[int]) -> list[DraftTree | None]:
        trees = []
        for row, limit in zip(rows, limits):
            tree = None
            if limit > 0:
                for branch in self.rows[row].continuations(min(self.candidates, limit), self.branches):
                    tree = tree or DraftTree()
                    tree.add_branch(branch, limit)
            trees.append(tree)
        return trees
