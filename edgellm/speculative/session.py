"""One request's speculation: what to propose at each decode step, and the bookkeeping after it
(the proposer's view of each row, statistics, and the adaptive back-off)."""

from __future__ import annotations

from .config import SpeculativeStats
from .tree import DraftTree

class RowBackoff:
    """A row whose drafts were all rejected `patience` times in a row sits out 1 step, then `growth`
    times longer after each further run of failures, up to `max_wait` steps; any accepted draft
    resets it. `trusted`: a draft of the row was accepted since its last failure. Cheap proposals
    (n-gram: a verify step costs ~1.1 plain steps) get patience 2, growth 2 and max_wait 32. Costly
    ones (a draft model runs its own steps) get patience 1, growth 4 and max_wait 256, and an
    untrusted row (at the start, and after a failure) proposes a single token, one draft step and the
    smallest verify tree, and a row whose first `give_up` attempts all failed (not one token accepted
    in the request yet) stops proposing for the rest of the request: a draft that never helps costs
    three probes per request, and one that helps is back to full proposals at its first accepted token."""

    def __init__(self, patience: int, max_wait: int, growth: int = 2, give_up: int | None = None):
        self.patience, self.max_wait, self.growth, self.give_up = patience, max_wait, growth, give_up
        self.wait = self.failures = 0
        self.penalty = 1
        self.trusted = False
        self.attempts = 0   # until the first accepted draft; then None
        self.stopped = False

    def allows(self) -> bool:
        if self.stopped:
            return False
        if self.wait:
            self.wait -= 1
            return False
        return True

    def update(self, accepted: int) -> None:
        self.trusted = accepted > 0
        if accepted:
            self.failures, self.penalty, self.attempts = 0, 1, None
            return
        if self.attempts is not None:
            self.attempts += 1
            self.stopped = self.give_up is not None and self.attempts >= self.give_up
        self.failures += 1
        if self.failures >= self.patience:
            self.wait, self.failures = self.penalty, 0
            self.penalty = min(self.growth * self.penalty, self.max_wait)


class Speculation:
    def __init__(self, proposer, prompts: list[list[int]], max_drafts: int, adaptive: bool):
        self.proposer = proposer
        self.prompts = prompts
        self.max_drafts = max_drafts
        self.costly = getattr(proposer, "costly", False)
        self.backoff = [RowBackoff(1, 256, 4, give_up=3) if self.costly else RowBackoff(2, 32, 2) for _ in prompts] \
            if adaptive else None
        self.stats = SpeculativeStats(accepted_flags=[[] for _ in prompts])
        # The proposer's name for each row: the row's index, or (the engine loop, where one proposer
        # serves every request) its KV slot, bound as it joins (join).
        self.keys = list(range(len(prompts)))
        self._joined: set[int] = set()

    def limit(self, row: int, left: int) -> int:
        """Drafts row `row` may propose this step (0: none): never more than it has tokens left to
        generate minus the target's own one, none while its back-off waits (one call a step)."""
        if self.backoff is not None and not self.backoff[row].allows():
            return 0
        return max(min(self._cap(row), left - 1), 0)

    def propose(self, rows: list[int], remaining: list[int]) -> list[DraftTree | None] | None:
        """Trees for these rows (None where a row proposes nothing), or None if no row proposes."""
        limits = [self.limit(row, left) for row, left in zip(rows, remaining)]
        if not any(limit > 0 for limit in limits):
            return None
        trees = self.proposer.propose([self.keys[row] for row in rows], limits)
        return trees if any(t is not None for t in trees) else None

    def sits_out(self, row: int) -> bool:
        """Row `row` will propose nothing at the next step (its back-off waits, or it stopped): the
        engine loop may run that step ahead as a plain one (pass_step), not read every token first."""
        backoff = self.backoff[row] if self.backoff is not None else None
        return backoff is not None and (backoff.stopped or backoff.wait > 0)

    def pass_step(self, row: int) -> None:
        """A plain step the row sat out (sits_out): one step of its back-off's wait spent, as limit() spends it."""
        if self.backoff is not None:
            self.backoff[row].allows()

    def _cap(self, row: int) -> int:
        """Drafts this row may propose now: one while a costly proposer's row is not trusted."""
        return 1 if self.costly and self.backoff is not None and not self.backoff[row].trusted else self.max_drafts

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
            self.proposer.extend(self.keys[row], tokens)

    def start(self, tokens: list[int]) -> None:
        """The proposer reads the prompts (a draft model prefills them: part of the request's prefill
        time) and the tokens sampled from the prefill, one per row (not a decode step's)."""
        self.begin()
        for row, token in enumerate(tokens):
            self.start_row(row, token)

    def begin(self) -> None:
        """The proposer reads the prompts, rows 0 .. n-1 (start's first half)."""
        self.proposer.begin(self.prompts)

    def start_row(self, row: int, token: int) -> None:
        """Row `row`'s first token, sampled from its prefill (not a decode step's)."""
        self.stats.accepted_flags[row].append(False)
        self.proposer.extend(self.keys[row], [token])

    def join(self, row: int, key: int, token: int) -> None:
        """The engine loop: row `row` starts in the shared proposer under `key` (its slot) from its
        prompt and first token."""
        self.keys[row] = key
        self._joined.add(row)
        self.proposer.begin_row(key, self.prompts[row])
        self.start_row(row, token)

    def finish(self, row: int) -> None:
        """The engine loop: row `row` left the batch (or never joined it); the proposer forgets it."""
        if row in self._joined:
            self._joined.discard(row)
            self.proposer.end_row(self.keys[row])
