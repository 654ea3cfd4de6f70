"""Scheduler: the waiting and running sequences and the KV slots they hold.

Admission is by free slot: each slot of the linear cache holds one sequence's whole prompt and output
(its length is checked against the capacity when the request is submitted), so a sequence that gets a
slot can always finish in it, and nothing is preempted. Waiting sequences are admitted lowest priority
value first, then in arrival order (first come, first served); the items of one request arrive
together. The waiting queue is bounded (max_queued): past it, add() raises QueueFullError at once.

Prefill: each iteration takes a chunk of at most `budget` prompt tokens (counted as its step computes
them: rows padded alike) from the admitted sequences still prefilling, the least prompt left first (a
long prompt is prefilled over several iterations, beside the running rows' decode steps, and a short
one that arrives meanwhile is not kept waiting behind it). Pure bookkeeping on the host: the engine loop asks, the runner computes.
"""

from __future__ import annotations

import heapq
import time
from typing import Callable

from ..errors import QueueFullError
from .sequence import Sequence


class Scheduler:
    def __init__(self, slots: int, max_queued: int | None = None):
        self.free: list[int] = list(range(slots))  # a heap: the lowest free slot first
        self.waiting: list[tuple[int, int, Sequence]] = []  # a heap of (priority, arrival number, sequence)
        self.running: list[Sequence] = []  # admitted, in admission order: prefilling or decoding
        self.max_queued = max_queued

    def add(self, sequences: list[Sequence]) -> None:
        """Queue one request's sequences (all of them, or none: QueueFullError)."""
        if self.max_queued is not None and len(self.waiting) + len(sequences) > self.max_queued:
            raise QueueFullError(f"{len(self.waiting)} sequences are waiting for a KV slot (max_queued "
                                 f"{self.max_queued}); {len(sequences)} more do not fit: retry later")
        for seq in sequences:
            heapq.heappush(self.waiting, (seq.priority, seq.number, seq))

    def admit(self, only: set | None = None) -> list[Sequence]:
        """Give free slots to the first waiting sequences (only those in `only`, where given: the others
        keep their places); returns the ones admitted now."""
        admitted, passed = [], []
        while self.free and self.waiting:
            entry = heapq.heappop(self.waiting)
            seq = entry[2]
            if seq.cancelled:
                continue
            if only is not None and seq not in only:
                passed.append(entry)
                continue
            seq.slot, seq.admitted = heapq.heappop(self.free), time.perf_counter()
            self.running.append(seq)
            admitted.append(seq)
        for entry in passed:
            heapq.heappush(self.waiting, entry)
        return admitted

    def prefill_chunks(self, budget: int, pad: Callable[[int], int] | None = None,
                       whole: bool = False) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to prefill now) for the prefilling sequences, the least prompt left first
        (then admission order), so that a short prompt arriving while a long one prefills starts
        decoding at once. The first takes up to `budget` (>= 1) tokens; the next ones join while the
        chunk's rows, each computed at the padded length of the longest (pad(tokens): the length its
        step pads a row of `tokens` to; default the tokens themselves), stay within `budget`, each
        taking up to the first's. whole=True: each takes all its prompt left (the first whatever the
        budget): for engines whose prompt must be prefilled in one call (LongRoPE)."""
        pad = pad or (lambda tokens: tokens)
        chunks, width = [], 0
        waiting = [seq for seq in self.running if seq.prefilling and not seq.cancelled and seq.image is None
                   and (seq.leader is None or seq.prefilled > 0)]  # (a follower waits for its leader's copy)
        for seq in sorted(waiting, key=lambda seq: len(seq.prompt) - seq.prefilled):
            left = len(seq.prompt) - seq.prefilled
            take = left if whole else min(left, budget if not chunks else width)
            if chunks and (len(chunks) + 1) * max(width, pad(take)) > budget:
                break
            width = max(width, pad(take))
            chunks.append((seq, take))
        return chunks

    def image_prefills(self) -> list[Sequence]:
        """The prefilling sequences with images (a vision model's items), each prefilled whole, apart."""
        return [seq for seq in self.running if seq.prefilling and not seq.cancelled and seq.image is not None]

    def decoding(self) -> list[Sequence]:
        """The running sequences past their prefill, not finished (the decode batch's rows)."""
        return [seq for seq in self.running if not seq.prefilling and not seq.done]

    def retire(self, seq: Sequence) -> None:
        """A finished or cancelled running sequence gives its slot back."""
        self.running.remove(seq)
        heapq.heappush(self.free, seq.slot)
        seq.finished = time.perf_counter()

    def drop_cancelled_waiting(self) -> list[Sequence]:
        """Remove cancelled sequences from the waiting queue; returns them."""
        dropped = [entry[2] for entry in self.waiting if entry[2].cancelled]
        if dropped:
            self.waiting = [entry for entry in self.waiting if not entry[2].cancelled]
            heapq.heapify(self.waiting)
        return dropped

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running
