"""Token sampling from logits: greedy, temperature, top-k, top-p, with per-row parameters.

Semantics follow transformers' logits processors applied in this order: temperature, then top-k
(ties with the k-th value are kept), then top-p on the renormalised distribution (drop the tokens
whose ascending cumulative probability is <= 1 - top_p, always keep the most likely one).
A row is greedy (argmax) when its temperature is 0 or its top_k is 1. top_k = 0 disables top-k,
top_p = 1 disables top-p.

Randomness is counter based: each row draws u = hash(seed, offset) in [0, 1), computed from device
tensors, so sampling needs no host RNG or synchronisation and can run inside a CUDA graph (advance
`offsets` between steps). The hash is a 32-bit murmur3 finaliser; a Triton kernel can compute the
same numbers bit for bit.
"""

import torch

_MASK32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    # int64 holds the 32-bit value; products wrap modulo 2^64, and the low 32 bits stay exact.
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def uniform_from_counter(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """A float32 in [0, 1) per row from (seed, offset): 24 random bits, deterministic."""
    s = seeds.to(torch.int64) & _MASK32
    o = offsets.to(torch.int64) & _MASK32
    x = _fmix32((s * 0x9E3779B1 + 0x7F4A7C15) & _MASK32)
    x = _fmix32((x ^ o) * 0x85EBCA77 & _MASK32)
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


def filtered_probs_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor) -> torch.Tensor:
    """The distribution a sampling row draws from: [B, V] float32, zero outside the allowed set."""
    vocab = logits.shape[-1]
    temp = temperature.float().clamp_min(1e-6)[:, None]
    scores = logits.float() / temp
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab)).long()
    kth_value = scores.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
    scores = scores.masked_fill(scores < kth_value, float("-inf"))
    ascending, order = scores.sort(dim=-1)
    cumulative = ascending.softmax(-1).cumsum(-1)
    drop_sorted = cumulative <= (1 - top_p.float())[:, None]
    drop_sorted[:, -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf")).softmax(-1)


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
               top_p: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; per-row temperature/top_p (float), top_k (int), seeds/offsets (int).

    Returns the chosen token ids [B] int64.
    """
    greedy_tokens = logits.argmax(-1)
    probs = filtered_probs_ref(logits, temperature, top_k, top_p)
    cdf = probs.cumsum(-1)
    target = uniform_from_counter(seeds, offsets) * cdf[:, -1]
    drawn = (cdf <= target[:, None]).sum(-1).clamp(max=logits.shape[-1] - 1)
    # Float rounding at the very top of the cdf could land on a zero-probability tail token.
    drawn = torch.where(probs.gather(-1, drawn[:, None])[:, 0] > 0, drawn, probs.argmax(-1))
    greedy = (temperature <= 0) | (top_k == 1)
    return torch.where(greedy, greedy_tokens, drawn)
