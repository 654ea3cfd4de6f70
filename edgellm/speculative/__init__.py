"""Speculative decoding: proposers of draft tokens (n-gram prompt lookup, a draft model) and the
per-request bookkeeping; the runner verifies the drafts (engine/verify.py)."""

from .config import METHODS, SpeculativeConfig, SpeculativeStats
from .ngram import NgramProposer
from .session import Speculation
from .tree import DraftTree


def make_proposer(config: SpeculativeConfig, runner):
    """The proposer `config` asks for, for a runtime whose engine is `runner`."""
    if config.method == "ngram":
        return NgramProposer(config.ngram_window, config.ngram_candidates, config.ngram_branches)
    from .draft import DraftModelProposer

    return DraftModelProposer(config, runner)


__all__ = ["METHODS", "DraftTree", "NgramProposer", "SpeculativeConfig", "SpeculativeStats", "Speculation",
           "make_proposer"]
