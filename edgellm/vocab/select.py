"""Which token ids a reduced vocabulary keeps.

Always kept (`required_ids`): every special / added token, BOS / EOS / pad / unk and the model's stop
ids, the tokens its chat template writes around turns, and the byte tokens that can spell any text
(so output from the reduced vocabulary is never stuck for a character). The rest of the budget goes
by rank:

- `frequency`: ids by how often they occur in the tokenized corpus (inputs and responses);
- `input_aware`: response tokens that also occur in their own input first (a model answering about a
  document copies its names and numbers), then by response frequency, then input frequency; the
  last `tolerance` of the budget keeps ids adjacent to the best-ranked ones (BPE merges learned
  together sit side by side, so a near miss of the corpus is often a neighbour of a kept id);
- `self`: input_aware over the model's own answers to the corpus inputs (no labelled responses needed).

Ties break by the lower id, so a corpus always gives the same map."""

from __future__ import annotations

import collections
from typing import Iterable

TEMPLATE_PROBE = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                  {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]


def required_ids(tokenizer, stop_ids: Iterable[int], vocab_size: int) -> set[int]:
    keep = set(tokenizer.added_token_ids()) | set(stop_ids) | set(tokenizer.byte_token_ids())
    keep |= {i for i in (tokenizer.token_to_id(t) for t in tokenizer.special_tokens.values()) if i is not None}
    if tokenizer.chat_template:
        for probe in (TEMPLATE_PROBE, TEMPLATE_PROBE[1:]):  # some templates refuse a system turn
            try:
                keep |= set(tokenizer.encode_chat(probe))
                break
            except Exception:  # the template's own error: try the next probe
                continue
    return {i for i in keep if 0 <= i < vocab_size}


def rank_frequency(inputs: list[list[int]], responses: list[list[int] | None]) -> list[int]:
    counts = collections.Counter()
    for ids in inputs + [r for r in responses if r]:
        counts.update(ids)
    return sorted(counts, key=lambda i: (-counts[i], i))


def rank_input_aware(inputs: list[list[int]], responses: list[list[int] | None]) -> list[int]:
    copied, answered, asked = collections.Counter(), collections.Counter(), collections.Counter()
    for prompt, response in zip(inputs, responses):
        asked.update(prompt)
        if response:
            answered.update(response)
            seen = set(prompt)
            copied.update(t for t in response if t in seen)
    ids = set(asked) | set(answered)
    return sorted(ids, key=lambda i: (-copied[i], -answered[i], -asked[i], i))


def choose(ranked: list[int], required: set[int], size: int, vocab_size: int, tolerance: float = 0.0) -> list[int]:
    """`size` ids: the required ones, then `ranked` in order, the last `tolerance` share of the free
    budget going to ids adjacent to already chosen ones (best-ranked first); ascending."""
    chosen = set(required)
    free = size - len(chosen)
    band = int(free * tolerance)
    for i in ranked:
        if len(chosen) >= size - band:
            break
        chosen.add(i)
    if band:
        for i in [*ranked, *sorted(required)]:
            for neighbour in (i + 1, i - 1):
                if len(chosen) >= size:
                    break
                if 0 <= neighbour < vocab_size:
                    chosen.add(neighbour)
    # A corpus too small to fill the budget: the lowest remaining ids (base tokens of BPE
    # vocabularies come first) make up the rest, so the map always has `size` ids.
    filler = iter(range(vocab_size))
    while len(chosen) < size:
        chosen.add(next(filler))
    return sorted(chosen)
