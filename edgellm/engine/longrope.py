"""LongRoPE (Phi-3 128k, Phi-4-mini) in LLMEngineRunner (a mixin: the state is the runner's).

One rotary table holds two halves: rows of prompts within the original context read short factors
below it and long ones from it on (each decode step is its own forward, as in transformers); rows of
prompts past it read the all-long half (a per-slot offset, so graphs need no host decision). When a
row that started within the original context first outgrows it, the runtime has its cache recomputed
with the long factors (switch_to_long_rope), as transformers' Phi-3 generate does; speculative trees
stop short of that step (drafts_before_long_rope_switch).
"""

from __future__ import annotations

import torch

from ..kernels import ops
from ..kernels.rope import longrope_inv_freqs


class LongRopeSteps:
    def _longrope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """LongRoPE as transformers runs it: a forward uses the long factors when its highest position
        reaches the original context length, else the short ones, and cos / sin carry the attention
        factor. Per row here: the table's first half serves rows whose prompt fits the original length
        (short rows below it, long rows from it on: each decode step is its own forward); its second
        half, all long, serves rows whose prompt is longer (offset by the capacity, set per slot by
        prefill_step)."""
        cfg = self.config
        capacity = cfg.max_kv_cache_capacity
        short, long, attention = longrope_inv_freqs(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
        cos_s, sin_s = ops.rope_cos_sin_cache(short.to(self.device), capacity)
        cos_l, sin_l = ops.rope_cos_sin_cache(long.to(self.device), capacity)
        cut = min(self.longrope_original, capacity)
        cos = torch.cat([cos_s[:cut], cos_l[cut:], cos_l]) * attention
        sin = torch.cat([sin_s[:cut], sin_l[cut:], sin_l]) * attention
        return cos.contiguous(), sin.contiguous()

    def crosses_original_context(self, prompt_length: int, length: int) -> bool:
        """Whether a sequence of `length` tokens (prompt and generated) whose prompt had prompt_length
        has just outgrown a LongRoPE model's original context: its next step feeds the token at
        position `original`, so its cached keys, rotated with the short factors, must be recomputed
        with the long ones first (switch_to_long_rope). transformers' Phi-3 generate does the same
        (it drops the cache and prefills the whole sequence once at that step)."""
        original = self.longrope_original
        return original is not None and prompt_length <= original and length == original + 1

    def drafts_before_long_rope_switch(self, prompt_length: int, length: int) -> int:
        """How many drafts a token tree may hold for a sequence of `length` tokens (its last not yet
        cached) without reaching the LongRoPE switch from before it: trees stop short of it, so the row
        crosses with a plain step and switches exactly as without speculation."""
        original, cached = self.longrope_original, length - 1  # the tree's root goes to position `cached`
        if original is None or prompt_length > original or cached >= original:
            return 1 << 30
        return original - cached - 1

    def cross_original_context(self, slots: list[int], prompts: list[list[int]], generated: list[list[int]],
                               adapters: list[str]) -> None:
        """Before a decode step: the rows (slot, prompt, tokens generated so far, adapter) whose next
        step passes the original context get their cache recomputed with the long factors."""
        crossing = [i for i, (p, g) in enumerate(zip(prompts, generated))
                    if self.crosses_original_context(len(p), len(p) + len(g))]
        if crossing:
            self.switch_to_long_rope([slots[i] for i in crossing], [prompts[i] + generated[i][:-1] for i in crossing],
                                     lora=[adapters[i] for i in crossing])

    def switch_to_long_rope(self, slots: list[int], token_ids: list[list[int]], lora=None) -> None:
        """Prefill each slot's cached tokens (token_ids: the sequence before its last token) again
        with the long factors, in place, while the decode batch runs on; its later steps read the
        long half of the table. lora: each row's adapter name (None: the active adapter)."""
        lengths = [len(ids) for ids in token_ids]
        ids = torch.zeros(len(token_ids), max(lengths), dtype=torch.int64)
        for row, seq in enumerate(token_ids):
            ids[row, :len(seq)] = torch.tensor(seq)
        self.prefill_step(self.embed(ids), lengths, slots=torch.tensor(slots, dtype=torch.int32), lora=lora,
                          long_rope=True)

