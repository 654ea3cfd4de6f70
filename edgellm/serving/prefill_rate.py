"""PrefillRate: the prefill time a KV hit's reused tokens saved, estimated for its KVReuseStats."""

from __future__ import annotations

from ..engine.kv_store import KVReuseStats


class PrefillRate:
    """What a KV hit's reused tokens saved: an estimate at the prefill time per token measured on
    prompts that reused nothing (an exponential average); before any such prompt (a process whose
    first request hits the disk tier), at the hit's own rate over the tokens it prefilled, where it
    prefilled OWN_RATE_MIN_TOKENS or more (fewer are mostly the step's fixed cost)."""
    OWN_RATE_MIN_TOKENS = 16

    def __init__(self):
        self.ms_per_token: float | None = None

    def account(self, reuse: KVReuseStats, prefilled: int, prefill_ms: float, own_ms: float) -> None:
        """One prompt's prefill (`prefilled` tokens in `prefill_ms`; `own_ms` of it its own prefill's,
        for the fallback rate): the rate updated where it reused nothing, the saving added to `reuse`."""
        if reuse.reused_tokens == 0 and prefilled > 0:
            rate = prefill_ms / prefilled
            self.ms_per_token = rate if self.ms_per_token is None else 0.5 * (self.ms_per_token + rate)
        rate = self.ms_per_token
        if rate is None and prefilled >= self.OWN_RATE_MIN_TOKENS:
            rate = own_ms / prefilled
        if rate is not None:
            reuse.prefill_ms_saved += reuse.reused_tokens * rate
