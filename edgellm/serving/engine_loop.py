"""EngineLoop: the one thread that drives the runner for submitted requests (continuous batching).

An iteration, while any sequence waits or runs:
  1. retire the cancelled sequences (their slots freed, their rows out of the decode batch);
  2. admit waiting sequences into free KV slots (scheduler.py); with KV reuse, copy each one's longest
     saved prefix into its slot (engine/kv_store.py), which it then does not prefill;
  3. launch one step: while rows decode, a mixed step (engine/mixed_steps.py) that runs their decode
     step and a chunk of the admitted prompts (up to `prefill_budget` tokens) in one forward, or their
     plain decode step where no prompt waits; with no row decoding, a prefill of up to the runner's
     prefill chunk of prompt tokens (runner.prefill_tokens), whose finished prompts join at once;
  4. read the step before it (run-ahead: the step just launched runs on the GPU meanwhile): each
     row's token goes to its sequence (streaming.advance_rows: EOS, max tokens, stop strings, text
     deltas); a chunk row whose prompt that step completed has its first token (its settings, seed,
     RNG offset 0), saves its new blocks (KV reuse) and joins the decode batch (runner.add_decode_rows);
  5. finished rows leave the batch (runner.keep_decode_rows); their handles complete.
Rows that follow a grammar (structured output) cannot run ahead; while one runs, a plain decode step goes in
halves (constrained_rows.py), so the host's work on a step still hides behind the device's next forward.
The batch's rows change between launches without waiting for the step in flight: every change is
queued on the device behind it. Running rows thus keep producing a token per step while long prompts
prefill beside them, and a row's tokens depend only on its own prompt, settings and seed, never on its
batch-mates (each row's RNG is its seed and offset; each kernel computes each row alone). Engines
without mixed steps (LongRoPE, multimodal RoPE, the exported backends, EDGELLM_MIXED_STEPS=0)
prefill in steps of their own between the decode steps.

The loop holds the runtime's engine turn (runtime.py) for as long as it has work, so LoRA changes and
`exclusive()` blocks wait for it to go idle. Streaming deltas are queued for the caller's thread
(RequestHandle.stream); no caller code runs on the loop's thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Iterator

import torch

from ..engine.devices import to_device
from ..engine.graphs import prefill_bucket
from ..multimodal import prefill_positions
from ..engine.modes import caller_kernel_settings, kernel_settings
from ..streaming import advance_rows
from . import constrained_rows
from .launched import Launched
from .prefill_rate import PrefillRate
from .request_handle import RequestHandle, hand_over
from .scheduler import Scheduler
from .sequence import Sequence
from .speculative_step import speculative_step

log = logging.getLogger("edgellm")

# Prompt tokens a mixed step takes beside the running rows' decode step. Measured on the H100 (1B shape,
# 16 clients, bench/serving.py): 256 / 384 / 512 gave 79.8 / 81.1 / 83.6% of the static batch's decode
# tok/s with inter-token p99 1.73 / 1.84 / 2.06x its median; 384 is the largest within 2x.
DEFAULT_PREFILL_BUDGET = 384


class EngineLoop:
    def __init__(self, runner, engine_turn, *, max_queued: int | None = None,
                 prefill_budget: int | None = None, kv_store=None, vision=None):
        """engine_turn(): the runtime's context manager that holds the engine (held while busy).
        kv_store: the runtime's TieredKVStore (KV reuse), or None. vision: a vision model's ImagePrompts
        (multimodal.py: its encoder keeps each image's output, keyed by its pixels), or None."""
        self.runner = runner
        self.kv_store = kv_store
        self.vision = vision
        self.prefill_rate = PrefillRate()  # the KV-reuse saving's estimate
        self._engine_turn = engine_turn
        self.prefill_budget = prefill_budget or DEFAULT_PREFILL_BUDGET
        self.scheduler = Scheduler(runner.config.max_supported_batch_size, max_queued)
        self.batch: list[Sequence] = []  # the runner's decode rows, in its order
        self._in_flight: collections.deque = collections.deque()  # Launched steps not yet read, oldest first
        self._masks_due: list[Sequence] = []  # constrained rows whose next token mask is still to be set
        # Steps run by kind: decode (decode_in_halves of them), mixed, prefill, verify.
        self.step_counts: collections.Counter = collections.Counter()
        self.shared_prompt_tokens = 0  # prompt tokens copied from a leader's slot instead of prefilled
        self._handles: dict[Sequence, RequestHandle] = {}
        self._work = threading.Condition()
        self._thread: threading.Thread | None = None
        self._settings = caller_kernel_settings()
        self._stopping = False

    def submit(self, handle: RequestHandle) -> None:
        """Queue a handle's sequences (QueueFullError past max_queued) and wake the loop. The loop's
        steps run under the kernels' RunSettings of the thread that submitted last (kernels/dispatch.py:
        they are per thread, so a caller's use_reference() block reaches the loop this way)."""
        with self._work:
            self.scheduler.add(handle.sequences)
            self._settings = caller_kernel_settings()
            for seq in handle.sequences:
                self._handles[seq] = handle
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="edgellm-engine-loop", daemon=True)
                self._thread.start()
            self._work.notify()

    def wake(self) -> None:
        with self._work:
            self._work.notify()

    @property
    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def stop(self, timeout: float = 10.0) -> None:
        """At interpreter exit (runtime.py registers it): the loop's thread ends once it has no work
        (waited for up to `timeout` s). A daemon thread still inside a torch call while the interpreter
        tears down aborts the process ("terminate called without an active exception")."""
        with self._work:
            self._stopping = True
            self._work.notify()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._work:
                while self.scheduler.idle:
                    if self._stopping:
                        return
                    self._work.wait()
            with self._engine_turn(), torch.inference_mode():
                while True:
                    with kernel_settings(self._settings):
                        self._guarded_iteration()
                    if self._idle():
                        break

    def run_until(self, handle: RequestHandle) -> Iterator[tuple[int, str]]:
        """Drive the loop's iterations on the calling thread, which holds the engine turn (inside
        runtime.exclusive(): the loop's own thread waits for it), until `handle` is done, yielding its
        text deltas between iterations (where the caller's code may run: no iteration is half done).
        Only its sequences are admitted: other threads' requests wait for the block to end."""
        while not handle.done():
            with torch.inference_mode():
                self._guarded_iteration(only=set(handle.sequences))
            yield from handle.ready_pieces()
        yield from handle.ready_pieces()
        self._idle()

    def _guarded_iteration(self, only: set | None = None) -> None:
        """One iteration; if it raises, every request in flight fails with the error (the loop goes on)."""
        try:
            self._iteration(only)
        except Exception as exc:  # noqa: BLE001 (handed to every request in flight)
            log.exception("engine loop iteration failed")
            self._fail_all(exc)

    def _idle(self) -> bool:
        """Whether nothing waits or runs; then the steps still in flight are dropped (they belong to
        finished rows only: nothing to read)."""
        with self._work:
            if self.scheduler.idle:
                self._in_flight.clear()
                return True
            return False

    def _iteration(self, only: set | None = None) -> None:
        with self._work:
            for seq in self.scheduler.drop_cancelled_waiting():
                self._finish(seq)
            self._retire([seq for seq in self.scheduler.running if seq.cancelled])
            admitted = self.scheduler.admit(only)
        for seq in admitted:  # (before its prompt's first chunk: its first token is processed too)
            if seq.processing is not None:
                self.runner.set_logit_processing(seq.slot, seq.processing, seq.prompt, seq.temperature)
            if seq.grammar is not None:  # (its first token's mask: the grammar's start)
                self._masks_due.append(seq)
            if seq.logprobs is not None:
                self.runner.want_logprobs(seq.slot, True)
        constrained_rows.set_masks(self)
        if self.kv_store is not None:
            for seq in admitted:
                if seq.leader is None:  # (a follower copies its leader's prompt instead)
                    self._restore(seq)
        with self._work:
            self._copy_shared_prompts()
        with self._work:
            with_images = self.scheduler.image_prefills()
        if with_images:
            self._prefill_images(with_images)
        mixed = bool(self.batch) and self.runner.takes_mixed_steps
        budget = min(self.prefill_budget, self.runner.prefill_chunk_size) if self.batch else \
            max(self.prefill_budget, self.runner.prefill_chunk_size)  # (nothing decodes: no one waits on it)
        with self._work:  # (LongRoPE: a prompt's rotation depends on its whole length, so it goes in one call)
            chunks = self.scheduler.prefill_chunks(budget, prefill_bucket, whole=self.runner.needs_rows_each_step)
        launched = halves = False
        if mixed and chunks:
            chunks = chunks[:1]  # one row a mixed step: the shapes runtime.capture_graphs() captures
            if self.kv_store is not None:  # the memory tiers' hits, copied before the step (queued first)
                self.kv_store.copy_blocks(*self.kv_store.take_pending())
            while constrained_rows.constrained(self) and self._in_flight:  # (a step in halves in flight:
                self._take(self._in_flight.popleft())  # the constrained rows' masks for this draw come from it)
            self._launch_mixed(chunks)
            launched = True
        else:
            if chunks:
                self._prefill(chunks, self._blocks_for(chunks))
            if self.batch and self._speculating():
                speculative_step(self)
            elif self.batch and constrained_rows.launches_halves(self):
                constrained_rows.decode_in_halves(self)  # (it read the steps before it between its halves)
                halves = True
            elif self.batch:
                self._launch_decode()
                launched = True
        ahead = 1 if halves or launched and self._may_run_ahead() and \
            not (self._speculating() or constrained_rows.constrained(self)) else 0
        while len(self._in_flight) > ahead:
            self._take(self._in_flight.popleft())
        with self._work:
            self._retire([seq for seq in self.scheduler.running if seq.done and not seq.prefilling])

    def _copy_shared_prompts(self) -> None:
        """Followers (Sequence.leader: n choices of one prompt) whose leader has prefilled all but its
        prompt's last token get that KV copied into their slot, and prefill only the last token (their
        first token then comes from their own seed). A follower whose leader has left (finished or
        cancelled: its slot may hold another prompt now) prefills on its own."""
        for seq in self.scheduler.running:
            leader = seq.leader
            if leader is None or seq.prefilled or seq.cancelled:
                continue
            shared = len(seq.prompt) - 1
            if leader.slot is None or leader.finished is not None or leader.cancelled or shared < 1:
                seq.leader = None
            elif leader.prefilled >= shared:
                self.runner.copy_prompt(leader.slot, seq.slot, shared)
                seq.prefilled = shared
                self.shared_prompt_tokens += shared

    def _blocks_for(self, chunks) -> tuple:
        """KV reuse: the memory tiers' pending hits, for the prefill step to copy when it takes every
        sequence they belong to (else copied now)."""
        if self.kv_store is None:
            return (), ()
        pending = self.kv_store.take_pending()
        if {slot for entries in pending for _, _, slot in entries} <= {seq.slot for seq, _ in chunks}:
            return pending
        self.kv_store.copy_blocks(*pending)
        return (), ()

    def _restore(self, seq: Sequence) -> None:
        """KV reuse: the admitted sequence's longest saved prefix copied into its slot (not prefilled)."""
        began = time.perf_counter()
        # (Image tokens are keyed by their image's digest; their rows' hits are copied now: their
        # prefill runs from embeddings, without the block copies of prefill_tokens.)
        keyed = seq.image.key_ids if seq.image is not None else seq.prompt
        seq.block_keys = self.kv_store.keys(keyed, self.runner.prefix_fingerprint(seq.adapter, len(seq.prompt)))
        seq.prefilled = self.kv_store.restore(seq.slot, len(seq.prompt), seq.block_keys, seq.reuse,
                                              defer=seq.image is None)
        seq.reuse.restore_ms += (time.perf_counter() - began) * 1e3

    def _prefill(self, chunks: list[tuple[Sequence, int]], blocks=((), ())) -> None:
        """A prefill step of its own (no mixed step): its finished prompts sample their first tokens
        and join the decode batch now."""
        runner = self.runner
        began = time.perf_counter()
        logits = runner.prefill_tokens([seq.prompt[:seq.prefilled + take] for seq, take in chunks],
                                       slots=[seq.slot for seq, _ in chunks], lora=[seq.adapter for seq, _ in chunks],
                                       cached_lengths=[seq.prefilled for seq, _ in chunks], pool_blocks=blocks[0],
                                       host_blocks=blocks[1])
        share = (time.perf_counter() - began) * 1e3 / sum(take for _, take in chunks)
        self.step_counts["prefill"] += 1
        for seq, take in chunks:
            seq.prefilled += take
            seq.prefill_ms += share * take
        ready = [i for i, (seq, _) in enumerate(chunks) if not seq.prefilling]
        if ready:
            self._sample_and_join([chunks[i][0] for i in ready], logits[to_device(ready, torch.int64, logits.device)])

    def _prefill_images(self, seqs: list[Sequence]) -> None:
        """Sequences with images, each prompt whole in one prefill step from embeddings: the token
        embeddings with the images' encoder outputs written over their placeholder rows (an image seen
        before comes from the encoder's cache; one inside a reused prefix is not encoded), and for
        multimodal RoPE the (t, h, w) positions and each row's decode offset (multimodal.py)."""
        runner = self.runner
        began = time.perf_counter()
        prompts, cached, images = [seq.prompt for seq in seqs], [seq.prefilled for seq in seqs], [seq.image for seq in seqs]
        width = max(len(p) - c for p, c in zip(prompts, cached))
        embeds = runner.embed(to_device([p[c:] + [0] * (width - len(p) + c) for p, c in zip(prompts, cached)],
                                        torch.int64, runner.device))
        vision_ms = self.vision.write_embeddings(embeds, images, cached)
        positions = offsets = None
        if runner.config.mrope_section is not None:
            positions, offsets = prefill_positions(prompts, images, cached, width)
        logits = runner.prefill_step(embeds, [len(p) for p in prompts], slots=[seq.slot for seq in seqs],
                                     lora=[seq.adapter for seq in seqs], cached_lengths=cached, positions=positions,
                                     position_offsets=offsets)
        self.step_counts["prefill"] += 1
        prefilled = sum(len(p) - c for p, c in zip(prompts, cached))
        share = max((time.perf_counter() - began) * 1e3 - vision_ms, 0.0) / prefilled
        for seq, c in zip(seqs, cached):
            seq.prefill_ms += share * (len(seq.prompt) - c)
            seq.vision_ms += vision_ms * (len(seq.prompt) - c) / prefilled
            seq.prefilled = len(seq.prompt)
        self._sample_and_join(seqs, logits)

    def _sample_and_join(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sequences whose prompt is in their slot, with their last prompt token's logits [n, vocab]:
        their first tokens drawn (their settings, RNG offset 0), and they join (_join)."""
        device = logits.device
        settings = [to_device(values, dtype, device) for values, dtype in
                    zip(self._row_settings(seqs), (torch.float32, torch.int32, torch.float32, torch.int64, torch.int64))]
        slots = [seq.slot for seq in seqs]
        if any(seq.logprobs is not None for seq in seqs):
            tokens, logprobs = self.runner.sample(logits, *settings, slots=slots, with_logprobs=True)
        else:
            tokens, logprobs = self.runner.sample(logits, *settings, slots=slots), None
        self._join(seqs, tokens.tolist(), logprobs)

    def _speculating(self) -> bool:
        """Some row of the batch may propose at the next step: its drafts follow from every token so
        far, so its steps are read before the next is launched (no run-ahead). Rows whose back-off
        sits the step out take plain steps, run ahead (_launch_decode spends their wait). Not while a
        row processes its logits or reports logprobs: verify steps do neither, so the batch takes plain
        steps then."""
        return any(seq.spec is not None and not seq.spec.sits_out(seq.spec_row) for seq in self.batch) and \
            not any(seq.processing is not None or seq.logprobs is not None for seq in self.batch)

    def _launch_mixed(self, chunks: list[tuple[Sequence, int]]) -> None:
        seqs = [seq for seq, _ in chunks]
        temperature, top_k, top_p, seeds, _ = self._row_settings(seqs)
        began = time.perf_counter()
        pending = self.runner.mixed_launch([seq.prompt[:seq.prefilled + take] for seq, take in chunks],
                                           [seq.slot for seq in seqs], [seq.prefilled for seq in seqs],
                                           [seq.adapter for seq in seqs], temperature, top_k, top_p, seeds)
        for seq, take in chunks:
            seq.prefilled += take
        self.step_counts["mixed"] += 1
        self._in_flight.append(Launched(list(self.batch), pending,
                                        [(seq, take, not seq.prefilling) for seq, take in chunks], began))

    def _join(self, seqs: list[Sequence], first: list[int], logprobs: list | None = None) -> None:
        """Sequences whose prompt is in their slot: KV reuse saves its new blocks; each gets its first
        token (and its logprobs' row, where they were computed), and those not finished by it join the
        decode batch (RNG offset 0: the first token's)."""
        now = time.perf_counter()
        for i, (seq, token) in enumerate(zip(seqs, first)):
            if seq.logprobs is not None and logprobs is not None and logprobs[i] is not None:
                seq.token_logprobs.append(logprobs[i])
            if self.kv_store is not None:
                self._save(seq)
            if seq.spec is not None:  # (its proposer's row is its slot)
                seq.spec.join(seq.spec_row, seq.slot, token)
            seq.first_token = now
            if seq.processing is not None:  # (a decode step counts its own tokens; the first comes from here)
                self.runner.count_output_token(seq.slot, token)
            self._advance(seq, [token])
        constrained_rows.set_masks(self)
        running = [(seq, token) for seq, token in zip(seqs, first) if not seq.done]
        if running:
            seqs = [seq for seq, _ in running]
            self.runner.add_decode_rows([token for _, token in running], [seq.slot for seq in seqs],
                                        *self._row_settings(seqs), lora=[seq.adapter for seq in seqs])
            self.batch.extend(seqs)
        if self.runner.switches.hand_over:  # (first tokens out to the streams before the next launch)
            hand_over()

    def _save(self, seq: Sequence) -> None:
        """KV reuse, once a prompt is in its slot: its new whole blocks saved, and the prefill its reused
        tokens saved estimated (PrefillRate)."""
        began = time.perf_counter()
        self.kv_store.save(seq.slot, seq.block_keys, seq.reuse)
        seq.reuse.save_ms += (time.perf_counter() - began) * 1e3
        self.prefill_rate.account(seq.reuse, len(seq.prompt) - seq.reuse.reused_tokens, seq.prefill_ms, seq.prefill_ms)

    def _row_settings(self, seqs: list[Sequence]):
        """(temperature, top_k, top_p, seeds, offsets) of these rows, offsets at 0 (the first token's)."""
        return ([s.temperature for s in seqs], [s.top_k for s in seqs], [s.top_p for s in seqs],
                [s.seed for s in seqs], [0] * len(seqs))

    def _launch_decode(self) -> None:
        runner = self.runner
        if runner.needs_rows_each_step:  # LongRoPE: rows about to pass the original context are recomputed
            runner.prepare_decode_rows([s.slot for s in self.batch], [s.prompt for s in self.batch],
                                       [s.row.ids for s in self.batch], [s.adapter for s in self.batch])
        self._count_decode_step()
        self._in_flight.append(Launched(list(self.batch), runner.decode_launch()))

    def _count_decode_step(self) -> None:
        self.step_counts["decode"] += 1
        for seq in self.batch:  # (speculating rows sitting this step out: one step of their wait spent)
            if seq.spec is not None and seq.spec.sits_out(seq.spec_row):
                seq.spec.pass_step(seq.spec_row)

    def _may_run_ahead(self) -> bool:
        """Whether a step is read only after the next is queued (Switches.run_ahead; not where each
        step's rows must be known first: LongRoPE), so the host's work on one step hides behind the
        device's on the next."""
        return self.runner.switches.run_ahead and not self.runner.needs_rows_each_step

    def _take(self, step: Launched) -> None:
        """A launched step's tokens to its rows (a row that finished since computed one more, dropped);
        its chunk rows whose prompt it completed get their first tokens and join the batch."""
        tokens = step.pending.wait()
        first, decoded = tokens[:len(step.chunks)], tokens[len(step.chunks):]
        logprobs = step.pending.logprobs()  # (None unless some row asks for them)
        first_logprobs, decoded_logprobs = (logprobs[:len(step.chunks)], logprobs[len(step.chunks):]) \
            if logprobs is not None else (None, None)
        speculating: dict = {}  # a request's Speculation -> (rows, tokens) its proposer reads
        for i, (seq, token) in enumerate(zip(step.rows, decoded)):
            if not seq.done:
                seq.offset += 1
                if seq.logprobs is not None:
                    seq.token_logprobs.append(decoded_logprobs[i])
                if seq.spec is not None:
                    entry = speculating.setdefault(seq.spec, ([], []))
                    entry[0].append(seq.spec_row)
                    entry[1].append([token])
                self._advance(seq, [token])
        constrained_rows.set_masks(self)
        for spec, (rows, new) in speculating.items():
            spec.record(rows, new)
        if not step.chunks:
            return
        share = (time.perf_counter() - step.began) * 1e3 / sum(take for _, take, _ in step.chunks)
        joining, tokens, rows = [], [], []
        for i, ((seq, take, ends), token) in enumerate(zip(step.chunks, first)):
            seq.prefill_ms += share * take
            if ends and not seq.cancelled and seq.finished is None:
                joining.append(seq)
                tokens.append(token)
                rows.append(first_logprobs[i] if first_logprobs is not None else None)
        self._join(joining, tokens, rows)

    def _advance(self, seq: Sequence, tokens: list[int]) -> None:
        refused = False
        if seq.grammar is not None:
            tokens, refused = constrained_rows.accept(seq, tokens)
        seq.token_times.extend([time.perf_counter()] * len(tokens))
        on_text = (lambda _, text: seq.on_text(text)) if seq.on_text is not None else None
        advance_rows([seq.row], [0], [tokens], seq.eos_token_ids, seq.max_new, on_text)
        if seq.grammar is not None and not seq.done:
            constrained_rows.after_advance(self, seq, refused, on_text)

    def _retire(self, finished: list[Sequence]) -> None:
        """Called holding self._work: the finished sequences leave the batch and give their slots back."""
        if not finished:
            return
        gone = set(finished)
        keep = [i for i, seq in enumerate(self.batch) if seq not in gone]
        if len(keep) != len(self.batch):  # (queued behind the step in flight, which computes their token too)
            if keep:
                self.runner.keep_decode_rows(keep)
            else:
                self.runner.end_decode()
            self.batch = [self.batch[i] for i in keep]
        for seq in finished:
            if seq.spec is not None:
                seq.spec.finish(seq.spec_row)
            self._release_processing(seq)
            self.scheduler.retire(seq)
            self._finish(seq)

    def _release_processing(self, seq: Sequence) -> None:
        """A leaving sequence's slot stops processing logits and writing logprobs."""
        if seq.processing is not None:
            self.runner.clear_logit_processing(seq.slot)
        if seq.logprobs is not None:
            self.runner.want_logprobs(seq.slot, False)

    def _finish(self, seq: Sequence) -> None:
        handle = self._handles.pop(seq, None)
        if handle is not None:
            handle._sequence_done(seq)

    def _fail_all(self, error: BaseException) -> None:
        """An iteration raised: every request in flight fails with it, the engine's batch is dropped."""
        with self._work:
            self._in_flight.clear()
            self.runner.end_decode()
            self.batch = []
            for seq in list(self.scheduler.running):
                self._release_processing(seq)
                self.scheduler.retire(seq)
            for _, _, seq in self.scheduler.waiting:
                seq.cancelled = True
            self.scheduler.drop_cancelled_waiting()
            handles = set(self._handles.values())
            self._handles.clear()
        for handle in handles:
            handle._fail(error)
