"""LongRoPE (Phi-3 128k, Phi-4-mini): its rotary tables and when a row's cache must be recomputed.

One rotary table holds two halves: rows of prompts within the original context read short factors
below it and long ones from it on (each decode step is its own forward, as in transformers); rows of
prompts past it read the all-long half (a per-slot offset, so graphs need no host decision). When a
row that started within the original context first outgrows it, its cache is recomputed with the
long factors (the runner's prepare_decode_rows, a prefill with long_rope=True), as transformers' Phi-3
generate does; speculative trees stop short of that step (LongRope.max_drafts).
"""

from __future__ import annotations

import torch

from ..kernels import ops
from ..kernels.rope import longrope_inv_freqs
from .config import EngineConfig


def longrope_original(cfg: EngineConfig) -> int | None:
    """The original context length of a LongRoPE model; None for other RoPE kinds."""
    scaling = cfg.rope_scaling or {}
    return int(scaling["original_max_position_embeddings"]) if scaling.get("rope_type") == "longrope" else None


def longrope_tables(cfg: EngineConfig, original: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """LongRoPE as transformers runs it: a forward uses the long factors when its highest position
    reaches the original context length, else the short ones, and cos / sin carry the attention factor.
    Per row here: the table's first half serves rows whose prompt fits the original length (short rows
    below it, long rows from it on: each decode step is its own forward); its second half, all long,
    serves rows whose prompt is longer (offset by the capacity, set per slot by the prefill)."""
    capacity = cfg.max_kv_cache_capacity
    short, long, attention = longrope_inv_freqs(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
    cos_s, sin_s = ops.rope_cos_sin_cache(short.to(device), capacity)
    cos_l, sin_l = ops.rope_cos_sin_cache(long.to(device), capacity)
    cut = min(original, capacity)
    cos = torch.cat([cos_s[:cut], cos_l[cut:], cos_l]) * attention
    sin = torch.cat([sin_s[:cut], sin_l[cut:], sin_l]) * attention
    return cos.contiguous(), sin.contiguous()


class LongRope:
    """A LongRoPE engine's host-side rule: which rows cross the original context, and when."""

    def __init__(self, original: int):
        self.original = original

    def crosses_original_context(self, prompt_length: int, length: int) -> bool:
        """Whether a sequence of `length` tokens (prompt and generated) whose prompt had prompt_length
        has just outgrown the original context: its next step feeds the token at position `original`,
        so its cached keys, rotated with the short factors, must be recomputed with the long ones first.
        transformers' Phi-3 generate does the same (it drops the cache and prefills the whole sequence
        once at that step)."""
        return prompt_length <= self.original and length == self.original + 1

    def max_drafts(self, prompt_length: int, length: int) -> int:
        """How many drafts a token tree may hold for a sequence of `length` tokens (its last not yet
        cached) without reaching the switch from before it: trees stop short of it, so the row crosses
        with a plain step and switches exactly as without speculation."""
        cached = length - 1  # the tree's root goes to position `cached`
        if prompt_length > self.original or cached >= self.original:
            return NO_DRAFT_LIMIT
        return self.original - cached - 1


NO_DRAFT_LIMIT = 1 << 30
