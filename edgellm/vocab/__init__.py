"""Vocabulary reduction (seed 000): build `vocab_map.safetensors` for a domain from a corpus.

corpus.py reads the corpus, select.py decides which ids to keep, reduce.py ties them together; the
map file itself is engine/vocab_map.py's (the engine reads it at load)."""

from .reduce import METHODS, ReducedVocab, reduce_vocab

__all__ = ["METHODS", "ReducedVocab", "reduce_vocab"]
