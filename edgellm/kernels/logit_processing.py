"""Logit processing before sampling, per row from its KV slot's settings (vLLM's order and semantics):
logit_bias added; the repetition penalty on tokens of the prompt or the output so far (a positive logit
divided by it, a negative one multiplied); the frequency and presence penalties subtracted per output
token (frequency x its count, presence once it occurred); the slot's allowed-token bitmask (a grammar's:
structured output) applied; then min_p: a token whose probability at the row's temperature is below
min_p x the top token's is ruled out. A ruled-out or disallowed token's logit is lowered to 200
temperatures (greedy rows: 200) under the row's best allowed one, where its probability is 0 in float32:
no infinities reach the sampling kernel's bisection. Rows whose slot is not enabled are left as they are
(padding rows sit on the scratch slot). Two launches over (row, block of the vocabulary): the penalties
and the mask, each block's max noted; then the floor, which needs the row's max.

Per-slot state ([slots, vocab] or [slots]): counts (int32, output tokens so far), seen (uint8: the
prompt's tokens), bias (float32), the scalars presence, frequency, repetition, min_p, temperature,
enabled, masked (int32 flags), and mask [slots, words] int32: bit j of word i allows token 32 i + j (the
layout XGrammar fills), indexed by full-vocabulary id; full_ids maps logits columns to those ids under a
reduced vocabulary (None: columns are ids). count_tokens adds each row's sampled token to its slot's
counts (inside the step, after the draw).
"""

import torch

from ._triton import tl, triton

_BLOCK = 1024  # logits per program: a 128K vocabulary row spreads over 126 programs
_RULED_OUT = 200.0  # temperatures under the row's best logit: exp(-200) is 0 in float32


@triton.jit
def _penalties_kernel(logits_ptr, stride_row, vocab, row_slots_ptr, enabled_ptr, counts_ptr, seen_ptr, bias_ptr,
                      presence_ptr, frequency_ptr, repetition_ptr, masked_ptr, mask_ptr, words, full_ids_ptr,
                      block_max_ptr, HAS_MAP: tl.constexpr, BLOCK: tl.constexpr):
    """One block of one row: bias, penalties and the token mask applied in place (a disallowed token at
    -inf until the second launch), the block's new max to block_max."""
    row = tl.program_id(0)
    block = tl.program_id(1)
    slot = tl.load(row_slots_ptr + row).to(tl.int64)
    if tl.load(enabled_ptr + slot) != 0:
        presence = tl.load(presence_ptr + slot)
        frequency = tl.load(frequency_ptr + slot)
        repetition = tl.load(repetition_ptr + slot)
        offs = block * BLOCK + tl.arange(0, BLOCK)
        mask = offs < vocab
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        state = slot * vocab
        x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        x += tl.load(bias_ptr + state + offs, mask=mask, other=0.0)
        count = tl.load(counts_ptr + state + offs, mask=mask, other=0)
        seen = tl.load(seen_ptr + state + offs, mask=mask, other=0)
        repeated = (seen != 0) | (count > 0)
        x = tl.where(repeated, tl.where(x > 0, x / repetition, x * repetition), x)
        x = x - frequency * count.to(tl.float32) - tl.where(count > 0, presence, 0.0)
        if tl.load(masked_ptr + slot) != 0:
            if HAS_MAP:
                ids = tl.load(full_ids_ptr + offs, mask=mask, other=0)
            else:
                ids = offs
            word = tl.load(mask_ptr + slot * words + ids // 32, mask=mask, other=0)
            x = tl.where(((word >> (ids % 32)) & 1) != 0, x, float("-inf"))
        tl.store(row_ptr + offs, x, mask=mask)
        tl.store(block_max_ptr + row * tl.num_programs(1) + block, tl.max(tl.where(mask, x, float("-inf")), axis=0))


@triton.jit
def _floor_kernel(logits_ptr, stride_row, vocab, row_slots_ptr, enabled_ptr, min_p_ptr, temperature_ptr, masked_ptr,
                  block_max_ptr, RULED_OUT: tl.constexpr, BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    """One block of one row whose slot sets min_p or a mask: logits under min_p's cut (from the row's
    max, the max of the blocks' maxima) and disallowed ones raised from -inf, to the floor."""
    row = tl.program_id(0)
    block = tl.program_id(1)
    slot = tl.load(row_slots_ptr + row).to(tl.int64)
    min_p = tl.load(min_p_ptr + slot)
    temperature = tl.load(temperature_ptr + slot)
    cuts = (min_p > 0) & (temperature > 0)
    if (tl.load(enabled_ptr + slot) != 0) & (cuts | (tl.load(masked_ptr + slot) != 0)):
        blocks = tl.arange(0, BLOCKS)
        maxima = tl.load(block_max_ptr + row * tl.num_programs(1) + blocks, mask=blocks < tl.num_programs(1),
                         other=float("-inf"))
        row_max = tl.max(maxima, axis=0)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # (nothing allowed: a flat row, no NaN)
        cut = tl.where(cuts, row_max + temperature * tl.log(tl.where(cuts, min_p, 1.0)), float("-inf"))
        floor = row_max - RULED_OUT * tl.where(temperature > 0, temperature, 1.0)
        offs = block * BLOCK + tl.arange(0, BLOCK)
        mask = offs < vocab
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        x = tl.load(row_ptr + offs, mask=mask, other=0.0)
        x = tl.where(x == float("-inf"), floor, tl.where(x < cut, tl.minimum(x, floor), x))
        tl.store(row_ptr + offs, x, mask=mask)


@triton.jit
def _count_kernel(tokens_ptr, row_slots_ptr, enabled_ptr, counts_ptr, vocab):
    row = tl.program_id(0)
    slot = tl.load(row_slots_ptr + row).to(tl.int64)
    if tl.load(enabled_ptr + slot) != 0:
        where = counts_ptr + slot * vocab + tl.load(tokens_ptr + row)
        tl.store(where, tl.load(where) + 1)


def process_logits(logits: torch.Tensor, row_slots: torch.Tensor, enabled: torch.Tensor, counts: torch.Tensor,
                   seen: torch.Tensor, bias: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor,
                   repetition: torch.Tensor, min_p: torch.Tensor, temperature: torch.Tensor, masked: torch.Tensor,
                   mask: torch.Tensor, full_ids: torch.Tensor | None = None) -> torch.Tensor:
    """In place on logits [rows, vocab] float32 (contiguous rows); row_slots [rows] int32; returns logits."""
    _check(logits, row_slots, counts, mask, full_ids)
    rows, vocab = logits.shape
    if rows:
        block = _BLOCK if logits.is_cuda else 64
        blocks = triton.cdiv(vocab, block)
        block_max = torch.empty(rows, blocks, dtype=torch.float32, device=logits.device)
        grid = (rows, blocks)
        _penalties_kernel[grid](logits, logits.stride(0), vocab, row_slots, enabled, counts, seen, bias, presence,
                                frequency, repetition, masked, mask, mask.shape[1],
                                full_ids if full_ids is not None else row_slots, block_max,
                                HAS_MAP=full_ids is not None, BLOCK=block, num_warps=4)
        _floor_kernel[grid](logits, logits.stride(0), vocab, row_slots, enabled, min_p, temperature, masked, block_max,
                            RULED_OUT=_RULED_OUT, BLOCK=block, BLOCKS=triton.next_power_of_2(blocks), num_warps=4)
    return logits


def count_tokens(tokens: torch.Tensor, row_slots: torch.Tensor, enabled: torch.Tensor, counts: torch.Tensor) -> None:
    """counts[slot, token] += 1 for each row whose slot is enabled (tokens: logits columns, [rows] int64).
    Rows have distinct slots, except padding rows on the scratch slot, which is never enabled."""
    if tokens.shape[0]:
        _count_kernel[(tokens.shape[0],)](tokens, row_slots, enabled, counts, counts.shape[1])


def process_logits_ref(logits, row_slots, enabled, counts, seen, bias, presence, frequency, repetition, min_p,
                       temperature, masked, mask, full_ids=None):
    _check(logits, row_slots, counts, mask, full_ids)
    slots = row_slots.long()
    on = enabled[slots] != 0
    x = logits.float() + bias[slots]
    count = counts[slots]
    repeated = (seen[slots] != 0) | (count > 0)
    rep = repetition[slots][:, None]
    x = torch.where(repeated, torch.where(x > 0, x / rep, x * rep), x)
    x = x - frequency[slots][:, None] * count.float() - torch.where(count > 0, presence[slots][:, None], 0.0)
    ids = torch.arange(x.shape[1], device=x.device) if full_ids is None else full_ids.long()
    allowed = (mask[slots][:, ids // 32] >> (ids % 32)) & 1 != 0
    disallowed = (masked[slots] != 0)[:, None] & ~allowed
    best = torch.where(disallowed, float("-inf"), x).max(-1, keepdim=True).values
    best = torch.where(best == float("-inf"), 0.0, best)
    temp, floor_p = temperature[slots][:, None], min_p[slots][:, None]
    floor = best - _RULED_OUT * torch.where(temp > 0, temp, 1.0)
    cut = best + temp * torch.log(floor_p.clamp_min(1e-45))
    ruled_out = (floor_p > 0) & (temp > 0) & (x < cut)
    x = torch.where(disallowed, floor, torch.where(ruled_out, torch.minimum(x, floor), x))
    logits.copy_(torch.where(on[:, None], x, logits.float()).to(logits.dtype))
    return logits


def count_tokens_ref(tokens, row_slots, enabled, counts) -> None:
    slots = row_slots.long()
    on = enabled[slots] != 0
    counts[slots[on], tokens[on]] += 1


def _check(logits, row_slots, counts, mask, full_ids) -> None:
    if logits.dim() != 2 or logits.stride(-1) != 1 or logits.dtype != torch.float32:
        raise ValueError("process_logits: logits must be [rows, vocab] float32 with a contiguous last dim")
    if row_slots.shape != (logits.shape[0],) or counts.shape[1] != logits.shape[1]:
        raise ValueError("process_logits: one slot per logits row, and per-slot state as wide as the vocabulary")
    if mask.dtype != torch.int32 or mask.dim() != 2 or mask.shape[0] != counts.shape[0]:
        raise ValueError("process_logits: the token mask must be [slots, words] int32")
    if full_ids is not None and full_ids.shape != (logits.shape[1],):
        raise ValueError("process_logits: full_ids maps each logits column to its full-vocabulary id")
