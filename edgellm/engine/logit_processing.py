"""Per-slot logit processing state (kernels/logit_processing.py): penalties, logit bias and min_p of the
rows that ask for them, applied inside the sampling of every step (prefill, decode, mixed) on the device;
and token logprobs (the sampled token's and the TOP_LOGPROBS best, from the raw logits' log-softmax),
written by those steps beside their tokens while some slot asks for them.

Settings live by KV slot, not by batch row: a step passes its rows' slots, and a row joining or leaving
the batch changes nothing here. enable() sets a slot's settings when its sequence is admitted (before
its prompt's first chunk: the first token is processed too), disable() when it leaves; the steps' graphs
carry the kernels only while some slot is enabled, and write logprobs only while some slot asks for
them (two flags of the graph keys), so requests without these settings pay nothing. Token ids are logits columns: with a reduced vocabulary, ids outside
it are dropped from the prompt's seen set and from logit_bias (they can never be sampled anyway).
"""

from __future__ import annotations

import dataclasses

import torch

from ..kernels import ops
from .devices import to_device

TOP_LOGPROBS = 20  # the most alternatives a token's logprobs report (OpenAI's top_logprobs bound)
LOGPROB_WIDTH = 1 + 2 * TOP_LOGPROBS  # a row of step logprobs: the sampled token's, the top values, their ids
_SCALARS = ("presence", "frequency", "repetition", "min_p", "temperature")


@dataclasses.dataclass(frozen=True)
class LogitSettings:
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (full-vocabulary token id, bias)

    @property
    def neutral(self) -> bool:
        return self == LogitSettings()


class _MaskStaging:
    """set_masks' pinned host rows and slot ids, their device twins, and the event after the last copy."""

    def __init__(self, slots: int, words: int, device: torch.device):
        self.words = torch.zeros(slots, words, dtype=torch.int32).pin_memory()
        self.slots = torch.zeros(slots, dtype=torch.int64).pin_memory()
        self.device_words = torch.zeros(slots, words, dtype=torch.int32, device=device)
        self.device_slots = torch.zeros(slots, dtype=torch.int64, device=device)
        self.copied = torch.cuda.Event()
        self.copied.record()


class LogitProcessing:
    def __init__(self, slots: int, vocab: int, device: torch.device, vocab_map: torch.Tensor | None = None,
                 full_vocab: int | None = None):
        """slots: the KV cache's slots, the scratch slot included; vocab: the logits' width; full_vocab: the
        model's vocabulary (the token masks' width; default: vocab)."""
        self.vocab, self.device = vocab, device
        self.counts = torch.zeros(slots, vocab, dtype=torch.int32, device=device)
        self.seen = torch.zeros(slots, vocab, dtype=torch.uint8, device=device)
        self.bias = torch.zeros(slots, vocab, dtype=torch.float32, device=device)
        self.enabled = torch.zeros(slots, dtype=torch.int32, device=device)
        # Allowed-token bitmasks (a grammar's, by full-vocabulary id: XGrammar's layout), read while masked.
        self.mask_words = ((full_vocab or vocab) + 31) // 32
        self.mask = torch.zeros(slots, self.mask_words, dtype=torch.int32, device=device)
        self.masked = torch.zeros(slots, dtype=torch.int32, device=device)
        self.full_ids = None if vocab_map is None else vocab_map.to(device=device, dtype=torch.int32)
        # The per-slot scalars, one row each of one table (enable() writes a slot's column in one copy).
        self.table = torch.zeros(len(_SCALARS), slots, dtype=torch.float32, device=device)
        self.scalars = dict(zip(_SCALARS, self.table.unbind(0)))
        self.on: set[int] = set()  # the enabled slots, on the host
        self.logprob_slots: set[int] = set()  # slots whose rows report token logprobs
        self._column = None if vocab_map is None else {int(full): i for i, full in enumerate(vocab_map.tolist())}
        self._staging = _MaskStaging(slots, self.mask_words, device) if device.type == "cuda" else None

    @property
    def processing(self) -> bool:
        """Steps launched now run the processing kernels (part of their graph keys)."""
        return bool(self.on)

    @property
    def logprobs(self) -> bool:
        """Steps launched now write their rows' logprobs (part of their graph keys)."""
        return bool(self.logprob_slots)

    def want_logprobs(self, slot: int, wanted: bool) -> None:
        (self.logprob_slots.add if wanted else self.logprob_slots.discard)(slot)

    def columns(self, ids) -> list[int]:
        """Full-vocabulary ids as logits columns (ids outside a reduced vocabulary dropped)."""
        if self._column is None:
            return [i for i in ids if 0 <= i < self.vocab]
        return [self._column[i] for i in ids if i in self._column]

    def enable(self, slot: int, settings: LogitSettings, prompt: list[int], temperature: float) -> None:
        """Slot `slot` processes its rows' logits with `settings` from now on (queued on the device: the
        steps in flight are unaffected), its output counts at zero and `prompt` as the seen tokens."""
        device = self.device
        self.counts[slot].zero_()
        self.seen[slot].zero_()
        self.bias[slot].zero_()
        if settings.repetition_penalty != 1.0:
            seen = sorted(set(self.columns(prompt)))
            if seen:
                self.seen[slot, to_device(seen, torch.int64, device)] = 1
        pairs = [(column, value) for (token, value) in settings.logit_bias for column in self.columns([token])]
        if pairs:
            self.bias[slot, to_device([c for c, _ in pairs], torch.int64, device)] = \
                to_device([v for _, v in pairs], torch.float32, device)
        self.table[:, slot].copy_(to_device([settings.presence_penalty, settings.frequency_penalty,
                                             settings.repetition_penalty, settings.min_p, temperature],
                                            torch.float32, device))  # (in _SCALARS' order)
        self.enabled[slot:slot + 1].fill_(1)
        self.on.add(slot)

    def disable(self, slot: int) -> None:
        if slot in self.on:
            self.enabled[slot:slot + 1].zero_()
            self.masked[slot:slot + 1].zero_()
            self.on.discard(slot)

    def set_masks(self, slots: list[int], words: torch.Tensor) -> None:
        """From the next step launched on, each enabled slot's row may draw only the tokens whose bits its
        row of `words` ([len(slots), mask_words] int32 on the host; the caller may refill it at once) sets;
        queued on the device behind the steps in flight. On CUDA the rows go through pinned staging
        buffers: a copy from pageable memory holds the host until the driver has staged it (16 rows of 128k
        tokens behind a running kernel, H100 host: 150 us, against 70 us through pinned memory;
        bench/grammar_masks.py), time the forward in flight must hide."""
        n = len(slots)
        if self.device.type != "cuda":
            index = torch.tensor(slots, dtype=torch.int64)
            self.mask.index_copy_(0, index, words[:n])
            self.masked.index_fill_(0, index, 1)
            return
        staging = self._staging
        staging.copied.synchronize()  # (the last copy out of the buffers: done a step ago)
        staging.words[:n].copy_(words[:n])
        staging.slots.numpy()[:n] = slots
        index = staging.device_slots[:n]
        index.copy_(staging.slots[:n], non_blocking=True)
        self.mask.index_copy_(0, index, staging.device_words[:n].copy_(staging.words[:n], non_blocking=True))
        self.masked.index_fill_(0, index, 1)
        staging.copied.record()

    def count(self, slot: int, token: int) -> None:
        """A token the slot's row got outside a decode step (its first, sampled after its prefill)."""
        if slot in self.on:
            columns = self.columns([token])
            if columns:
                self.counts[slot, columns[0]] += 1

    def process(self, logits: torch.Tensor, row_slots: torch.Tensor) -> torch.Tensor:
        """In place on logits [rows, vocab] float32; row_slots [rows] int32 (device)."""
        s = self.scalars
        return ops.process_logits(logits, row_slots, self.enabled, self.counts, self.seen, self.bias, s["presence"],
                                  s["frequency"], s["repetition"], s["min_p"], s["temperature"], self.masked, self.mask,
                                  self.full_ids)

    def count_sampled(self, columns: torch.Tensor, row_slots: torch.Tensor) -> None:
        """Each row's sampled token (a logits column) added to its slot's counts, inside the step."""
        ops.count_tokens(columns, row_slots, self.enabled, self.counts)


def step_logprobs(raw: torch.Tensor, columns: torch.Tensor, full_ids, out: torch.Tensor) -> None:
    """out [rows, LOGPROB_WIDTH] float32: each row's sampled token's log-probability under the raw logits,
    then the TOP_LOGPROBS best log-probabilities and their full-vocabulary ids (exact in float32 below 2^24)."""
    lse = torch.logsumexp(raw, dim=-1, keepdim=True)
    top = torch.topk(raw, min(TOP_LOGPROBS, raw.shape[-1]), dim=-1)
    k = top.values.shape[-1]
    out[:, :1].copy_(raw.gather(-1, columns[:, None]) - lse)
    out[:, 1:1 + k].copy_(top.values - lse)
    out[:, 1 + TOP_LOGPROBS:1 + TOP_LOGPROBS + k].copy_(full_ids(top.indices).to(torch.float32))
