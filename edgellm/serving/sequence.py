"""Sequence: one generated row of a request, from its arrival to its finish. Everything that may differ
between the rows of one running batch lives here: prompt, sampling settings and RNG offset, limits,
adapter, stop ids and strings (the latter in its GenerationRow's text), its request's speculation, the KV
slot it holds and how much of its prompt is in that slot's cache, and its timings."""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable

from ..engine.kv_store import KVReuseStats
from ..streaming import GenerationRow

_arrivals = itertools.count()  # ties in arrival time keep submission order


@dataclasses.dataclass(eq=False)
class Sequence:
    prompt: list[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    max_new: int
    adapter: str  # "" = the base model
    row: GenerationRow  # the generated ids, finish reason and live text (streaming.py)
    eos_token_ids: frozenset[int] = frozenset()  # ids that end the row (reason "stop")
    priority: int = 0  # lower first, as vLLM's; then arrival order
    on_text: Callable[[str], None] | None = None  # this row's streamed text deltas
    number: int = dataclasses.field(default_factory=lambda: next(_arrivals))
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    slot: int | None = None  # the KV slot, once admitted
    prefilled: int = 0  # prompt tokens already in the slot's cache
    offset: int = 0  # the RNG offset used last (each sampled token advances it by one)
    cancelled: bool = False
    reuse: KVReuseStats | None = None  # with KV reuse: this row's lookups, hits and saves (engine/kv_store.py)
    block_keys: list[bytes] | None = None  # its prompt's block keys, hashed once for the restore and the save
    prefill_ms: float = 0.0  # its share of the prefill calls' host time (the saving's estimate)
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)  # when each token reached the row
    spec: object | None = None  # with speculation: its request's Speculation (speculative/session.py) ...
    spec_row: int = 0  # ... in which this sequence is row spec_row
    image: object | None = None  # a vision model's item with images: its ImagePrompt (multimodal.py; prompt = its ids)
    vision_ms: float = 0.0  # its share of the vision encoder's time
    processing: object | None = None  # penalties, logit bias, min_p: its LogitSettings (engine/logit_processing.py)
    grammar: object | None = None  # structured output: its RowGrammar (grammar/backend.py), fed every token
    logprobs: int | None = None  # token logprobs with this many alternatives each (None: none reported)
    leader: "Sequence | None" = None  # an earlier item of its request with the same prompt and adapter, whose
    # prompt's KV is copied into this one's slot (all but the last token) instead of prefilled again
    token_logprobs: list = dataclasses.field(default_factory=list)  # per token: a step's LOGPROB_WIDTH values

    @property
    def done(self) -> bool:
        return self.row.finish_reason is not None or self.cancelled

    @property
    def prefilling(self) -> bool:
        """Admitted, with prompt tokens still to prefill (no token sampled yet)."""
        return self.slot is not None and self.prefilled < len(self.prompt)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
