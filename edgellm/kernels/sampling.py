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

Kernel: one program per row, no sort. Top-k and top-p become value thresholds found by bisection
over the row (each step one pass that counts, or sums the probability mass of, the values above a
candidate threshold; the row stays in L2 between passes). Then one pass draws the token by inverse
CDF over the kept values, in vocabulary order, exactly as the reference does.
"""

import torch

from ._triton import pdl_release, pdl_wait, tl, triton, use_pdl

_MASK32 = 0xFFFFFFFF
_BLOCK = 8192  # large tiles and 32 warps: each pass is latency-bound (H100 sweep of tiles and warps)
_MAX_BISECT = 64  # float32 bisection ends well before this; it only bounds a pathological row


@triton.jit
def _fmix32_tl(x):
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _count_mass_above(row_ptr, vocab, inv_t, row_max, threshold, BLOCK: tl.constexpr):
    """(count, mass) of the scaled values >= threshold; mass = sum of exp(value - row_max)."""
    count = tl.zeros([BLOCK], dtype=tl.int32)
    mass = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        s = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32) * inv_t
        keep = s >= threshold
        count += keep.to(tl.int32)
        mass += tl.where(keep, tl.exp(s - row_max), 0.0)
    return tl.sum(count, axis=0), tl.sum(mass, axis=0)


@triton.jit
def _highest_threshold(row_ptr, vocab, inv_t, s_max, lo, count_lo, goal, BY_MASS: tl.constexpr,
                       MAX_BISECT: tl.constexpr, BLOCK: tl.constexpr):
    """The highest threshold in [lo, s_max] whose kept values (the scaled values >= it) still reach
    `goal`, bisecting [lo, hi) with lo reaching it and hi not: a count of values (top-k; done once lo
    keeps exactly `goal`) or, BY_MASS, their probability mass (top-p; done once lo keeps at most one
    value more than hi). count_lo: how many values lo keeps. Each step is one pass over the row."""
    hi = s_max + tl.abs(s_max) * 1e-6 + 1e-30
    count_hi = count_lo * 0  # int32 flags and counters: loop-carried values need fixed types
    if BY_MASS:
        done = (count_lo <= 1).to(tl.int32)
    else:
        done = (count_lo == goal).to(tl.int32)
    steps = count_lo * 0
    while (done == 0) & (steps < MAX_BISECT):
        mid = lo + (hi - lo) * 0.5
        if (mid <= lo) | (mid >= hi):
            done = done * 0 + 1
        else:
            count, mass = _count_mass_above(row_ptr, vocab, inv_t, s_max, mid, BLOCK)
            if BY_MASS:
                reached = mass >= goal
            else:
                reached = count >= goal
            if reached:
                lo = mid
                count_lo = count
                if not BY_MASS:  # (here, where lo moves: top-k ran 3% slower with the test after the branches)
                    done = (count == goal).to(tl.int32)
            else:
                hi = mid
                count_hi = count
            if BY_MASS:
                done = (count_lo - count_hi <= 1).to(tl.int32)
        steps += 1
    return lo


@triton.jit
def _sample_kernel(logits_ptr, stride_row, vocab, temp_ptr, topk_ptr, topp_ptr, seed_ptr, offset_ptr, out_ptr, group,
                   BLOCK: tl.constexpr, MAX_BISECT: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    settings = row // group  # `group` logits rows share one row of settings
    temperature = tl.load(temp_ptr + settings)
    top_k = tl.load(topk_ptr + settings)
    top_p = tl.load(topp_ptr + settings)

    # Pass 1: max, min and the first argmax of the raw logits.
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK], dtype=tl.int32)
    low = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        better = x > best
        best_idx = tl.where(better, offs, best_idx)
        best = tl.where(better, x, best)
        low = tl.minimum(low, tl.where(offs < vocab, x, float("inf")))
    row_max = tl.max(best, axis=0)
    argmax = tl.min(tl.where(best == row_max, best_idx, vocab), axis=0)
    token = argmax
    if (temperature > 0) & (top_k != 1):
        inv_t = 1.0 / temperature
        s_max = row_max * inv_t
        s_min = tl.min(low, axis=0) * inv_t
        threshold = s_min
        # Top-k: the k-th largest value (the highest threshold that keeps k values).
        if (top_k > 0) & (top_k < vocab):
            threshold = _highest_threshold(row_ptr, vocab, inv_t, s_max, s_min, vocab, top_k, False, MAX_BISECT, BLOCK)
        # Top-p over the top-k set: the largest value whose mass-from-the-top reaches top_p.
        if top_p < 1.0:
            count_lo, mass_lo = _count_mass_above(row_ptr, vocab, inv_t, s_max, threshold, BLOCK)
            threshold = _highest_threshold(row_ptr, vocab, inv_t, s_max, threshold, count_lo, top_p * mass_lo, True,
                                           MAX_BISECT, BLOCK)
        # Draw: inverse CDF over the kept values in vocabulary order.
        _, total = _count_mass_above(row_ptr, vocab, inv_t, s_max, threshold, BLOCK)
        seed = tl.load(seed_ptr + settings).to(tl.int64) & 0xFFFFFFFF
        offset = tl.load(offset_ptr + row).to(tl.int64) & 0xFFFFFFFF
        x = _fmix32_tl((seed * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF)
        x = _fmix32_tl(((x ^ offset) * 0x85EBCA77) & 0xFFFFFFFF)
        u = (x >> 8).to(tl.float32) * (1.0 / 16777216.0)
        target = u * total
        running = 0.0
        drawn = vocab
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            s = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32) * inv_t
            e = tl.where(s >= threshold, tl.exp(s - s_max), 0.0)
            cdf = tl.cumsum(e, axis=0) + running
            drawn = tl.minimum(drawn, tl.min(tl.where((cdf > target) & (e > 0), offs, vocab), axis=0))
            running += tl.sum(e, axis=0)
        token = tl.where(drawn < vocab, drawn, argmax)
    pdl_release(PDL)
    tl.store(out_ptr + row, token.to(tl.int64))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, offsets: torch.Tensor, *, group: int = 1, block: int | None = None,
           num_warps: int | None = None) -> torch.Tensor:
    """group: each `group` consecutive logits rows share one row of temperature / top_k / top_p /
    seeds (a verify step's tree nodes share their row's settings); offsets stay one per logits row.
    block / num_warps override the per-row tile (benchmarks); defaults suit a 128k vocabulary."""
    _check_group(logits, temperature, offsets, group)
    batch, vocab = logits.shape
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    dev = logits.device
    pdl = use_pdl(logits)
    _sample_kernel[(batch,)](
        logits, logits.stride(0), vocab, temperature.to(dev, torch.float32).contiguous(),
        top_k.to(dev, torch.int32).contiguous(), top_p.to(dev, torch.float32).contiguous(),
        seeds.to(dev, torch.int64).contiguous(), offsets.to(dev, torch.int64).contiguous(), out, group,
        BLOCK=block or (_BLOCK if logits.is_cuda else 128), MAX_BISECT=_MAX_BISECT,
        PDL=pdl, num_warps=num_warps or (32 if logits.is_cuda else 4), launch_pdl=pdl > 0)
    return out


def _check_group(logits: torch.Tensor, temperature: torch.Tensor, offsets: torch.Tensor, group: int) -> None:
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError("sample: logits must be [B, V] with a contiguous last dim")
    if group < 1 or temperature.shape[0] * group != logits.shape[0] or offsets.shape[0] != logits.shape[0]:
        raise ValueError(f"sample: {logits.shape[0]} logits rows need {logits.shape[0]} offsets and "
                         f"{logits.shape[0]} / group={group} rows of settings")


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
               top_p: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor, *, group: int = 1) -> torch.Tensor:
    """logits [B, V]; per-row temperature/top_p (float), top_k (int), seeds/offsets (int); with
    group > 1 the settings (not the offsets) have one row per `group` logits rows.

    Returns the chosen token ids [B] int64.
    """
    _check_group(logits, temperature, offsets, group)
    if group > 1:
        temperature, top_k, top_p, seeds = (x.repeat_interleave(group) for x in (temperature, top_k, top_p, seeds))
    greedy_tokens = logits.argmax(-1)
    greedy = (temperature <= 0) | (top_k == 1)
    if not logits.is_cuda and bool(greedy.all()):  # (a free check on the CPU) no distribution to draw from
        return greedy_tokens
    probs = filtered_probs_ref(logits, temperature, top_k, top_p)
    cdf = probs.cumsum(-1)
    target = uniform_from_counter(seeds, offsets) * cdf[:, -1]
    drawn = (cdf <= target[:, None]).sum(-1).clamp(max=logits.shape[-1] - 1)
    # Float rounding at the very top of the cdf could land on a zero-probability tail token.
    drawn = torch.where(probs.gather(-1, drawn[:, None])[:, 0] > 0, drawn, probs.argmax(-1))
    return torch.where(greedy, greedy_tokens, drawn)
