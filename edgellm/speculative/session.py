"""One request's speculation: what to propose at each decode step, and the bookkeeping after it
(the proposer's view of each row, statistics, and the adaptive back-off)."""

from __future__ import annotations

from .config import SpeculativeStats
from .tree import DraftTree

class RowBackoff:
    """A row whose drafts were all rejected `patience` times in a row sits out 1, then 2, 4, ... up to
    `max_wait` steps before proposing again; any accepted draft resets it. Cheap proposals (n-gram:
    a verify step costs ~1.1 plain steps) get patience 2 and max_wait 32; costly ones (a draft model
    runs k steps of its own) patience 1 and max_wait 256, so a draft that never helps stops costing
    anything within a few dozen steps."""

    def __init__(self, patience: int, max_wait: int):
        self.patience, self.max_wait = patience, max_wait
        self.wait = self.failures = 0
        self.penalty = 1

    def allows(self) -> bool:
        if self.wait:
            self.wait -= 1
            return False
        return True

    def update(self, accepted: int) -> None:
        if accepted:
            self.failures, self.penalty = 0, 1
            return
        self.failures += 1
        if self.failures >= self.patience:
            self.wait, self.penalty, self.failures = self.penalty, min(2 * self.penalty, self.max_wait), 0


class Speculation:
    def __init__(self, proposer, prompts: list[list[int]], max_drafts: int, adaptive: bool):
        self.proposer = proposer
        self.prompts = prompts
        self.max_drafts = max_drafts
        costly = getattr(proposer, "costly", False)
        self.backoff = [RowBackoff(1 if costly else 2, 256 if costly else 32) for _ in prompts] if adaptive else None
        self.stats = SpeculativeStats(accepted_flags=[[] for _ in prompts])

    def propose(self, rows: list[int], remaining: list[int]) -> list[DraftTree | None] | None:
        """Trees for these rows (None where a row proposes nothing), or None if no row proposes.
        A row never gets more drafts than it has tokens left to generate, minus the target's own one."""
        limits = [min(self.max_drafts, left - 1) if self.backoff is None or self.backoff[row].allows() else 0
                  for row, left in zip(rows, remaining)]
        if not any(limit > 0 for limit in limits):
            return None
        trees = self.proposer.propose(rows, limits)
        return trees if any(t is not None for t in trees) else None

    def record(self, rows: list[int], new_tokens: list[list[int]], trees=None, accepted=None) -> None:
        """Tokens a step gave each row: a verify step (trees, accepted drafts per row) or a plain one."""
        stats = self.stats
        if trees is None:
            stats.plain_steps += 1
        else:
            stats.verify_steps += 1
        for k, (row, tokens) in enumerate(zip(rows, new_tokens)):
            kept = accepted[k] if trees is not None else 0
            if trees is not None and trees[k] is not None:
                stats.proposed += trees[k].drafts
                stats.accepted += kept
                if self.backoff is not None:
                    self.backoff[row].update(kept)
            stats.tokens += len(tokens)
            stats.accepted_flags[row] += [True] * kept + [False] * (len(tokens) - kept)
            self.proposer.extend(row, tokens)

    def start(self, tokens: list[int]) -> None:
        """The proposer reads the prompts (a draft model prefills them: part of the request's prefill
        time) and the tokens sampled from the prefill, one per row (not a decode step's)."""
        self.proposer.begin(self.prompts)
        for row, token in enumerate(tokens):
            self.stats.accepted_flags[row].append(False)
            self.proposer.extend(row, [token])
