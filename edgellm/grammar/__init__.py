"""Structured output: what a request constrains its rows to (spec.py: OpenAI's response_format and the
guided_* extras, as a GrammarSpec) and the grammar engine that turns a spec into each step's
allowed-token bitmask (backend.py: XGrammar, the `structured` extra). The engine loop fills a row's mask
before each step it is in and feeds the matcher each token the row draws (serving/engine_loop.py); the
sampling step applies the mask on the device (kernels/logit_processing.py)."""

from .spec import GrammarSpec, grammar_spec

__all__ = ["GrammarSpec", "grammar_spec"]
