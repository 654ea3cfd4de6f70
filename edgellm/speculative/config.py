"""SpeculativeConfig (what a runtime speculates with) and SpeculativeStats (what it got)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import ConfigurationError
from ..kernels.tree_mask import MAX_TREE

METHODS = ("ngram", "draft")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """method "ngram": prompt lookup, no extra model (seed 003's draft_matching_window_size and
    draft_num_candidate_tokens); "draft": a smaller model with the same tokenizer proposes.

    max_verify_tokens: nodes of the largest tree verified in one step, the row's last token included
    (default 16, at most 64). ngram_window: the longest n-gram matched (shorter ones are tried when it
    finds nothing, down to 1). ngram_candidates: tokens proposed after a match. ngram_branches:
    distinct continuations of the matched n-gram kept as branches of one tree. draft_model: the draft
    model's directory; num_speculative_tokens: its chain length k; draft_top_k > 1 adds the draft's
    next best tokens as sibling leaves at every depth. adaptive: a row whose drafts keep failing
    stops proposing for a while (longer each time), so speculation costs little where nothing matches.
    """

    method: str = "ngram"
    max_verify_tokens: int = 16
    ngram_window: int = 3
    ngram_candidates: int = 10
    ngram_branches: int = 4
    draft_model: str | Path | None = None
    num_speculative_tokens: int = 4
    draft_top_k: int = 1
    adaptive: bool = True

    def check(self) -> None:
        if self.method not in METHODS:
            raise ConfigurationError(f"unknown speculative method {self.method!r}; use one of {', '.join(METHODS)}")
        for name, low, high in (("max_verify_tokens", 2, MAX_TREE), ("ngram_window", 1, 64),
                                ("ngram_candidates", 1, MAX_TREE - 1), ("ngram_branches", 1, MAX_TREE - 1),
                                ("num_speculative_tokens", 1, MAX_TREE - 1), ("draft_top_k", 1, MAX_TREE - 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigurationError(f"SpeculativeConfig.{name} must be an integer in [{low}, {high}], got {value!r}")
        if self.method == "draft":
            if self.draft_model is None:
                raise ConfigurationError("speculative method 'draft' needs draft_model (a model directory)")
            if not Path(self.draft_model).is_dir():
                raise ConfigurationError(f"draft model directory {self.draft_model} does not exist")
            nodes = 1 + self.num_speculative_tokens * self.draft_top_k
            if nodes > self.max_verify_tokens:
                raise ConfigurationError(
                    f"a draft tree of num_speculative_tokens {self.num_speculative_tokens} x draft_top_k "
                    f"{self.draft_top_k} nodes (+1 for the root) exceeds max_verify_tokens {self.max_verify_tokens}")
        elif self.draft_model is not None:
            raise ConfigurationError("draft_model is given but method is 'ngram' (use method='draft')")


@dataclasses.dataclass
class SpeculativeStats:
    """Speculation in one response. accepted_flags[i][j]: item i's output token j came from an
    accepted draft (the other tokens are the target's own: a correction, a bonus or a plain step)."""

    proposed: int = 0        # draft tokens verified
    accepted: int = 0        # of them, accepted
    verify_steps: int = 0    # speculative steps
    plain_steps: int = 0     # steps where no row proposed anything
    tokens: int = 0          # tokens the decode steps produced (all rows)
    propose_ms: float = 0.0  # host time spent proposing drafts and packing them for the verify step
    accepted_flags: list[list[bool]] = dataclasses.field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens per row and step, over the decode steps (1.0 without speculation)."""
        rows_steps = self.tokens - self.accepted
        return self.tokens / rows_steps if rows_steps else 0.0

    def as_dict(self) -> dict:
        return {"proposed": self.proposed, "accepted": self.accepted, "verify_steps": self.verify_steps,
                "plain_steps": self.plain_steps, "tokens": self.tokens, "propose_ms": self.propose_ms,
                "acceptance_rate": self.acceptance_rate,
                "tokens_per_step": self.tokens_per_step}
