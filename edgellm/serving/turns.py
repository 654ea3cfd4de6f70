"""One request at a time on the engine: the path of the runtimes the engine loop (engine_loop.py) does not
serve yet, those with speculative decoding or a vision model. A request holds the engine's turn
(runtime.py's FifoLock) from its prefill to its last token: each slot i serves item i; with KV reuse each
slot first gets its prompt's longest saved prefix; images are encoded into the prompt's embeddings; the
decode loop runs one step ahead where no host decision feeds the next step; speculation proposes token
trees (speculative/) and verify_sample_trees checks them."""

from __future__ import annotations

import collections
import time
from typing import Callable

import torch

from ..engine.kv_store import KVReuseStats
from ..multimodal import ImagePrompt, prefill_positions
from ..requests import GenerationTimings, LLMGenerationRequest, SamplingSettings, item_seeds
from ..speculative import Speculation
from ..streaming import GenerationRow, RowText, advance_rows
from .engine_loop import PrefillRate

# Called as on_text(item_index, text_delta) while generating, for streaming output.
TextCallback = Callable[[int, str], None]


class TurnTaking:
    def __init__(self, runtime):
        self.rt = runtime
        self._row_tensors: dict[tuple, tuple] = {}  # sampling_tensors' reusable part, by (batch, settings)
        self.prefill_rate = PrefillRate()  # the KV-reuse saving's estimate

    def speculation(self, request: LLMGenerationRequest, prompts: list[list[int]]) -> Speculation | None:
        """This request's speculation, unless the runtime has none or the request turns it off."""
        if self.rt._proposer is None or request.speculative is False:
            return None
        config = self.rt.speculative
        return Speculation(self.rt._proposer, prompts, config.max_verify_tokens - 1, config.adaptive)

    def sampling_tensors(self, sampling: SamplingSettings, batch: int):
        """(temperature, top_k, top_p, seeds, offsets, slots) of a batch's rows on the device. All but
        the seeds depend only on the batch size and the settings: they are made once and reused (each
        small tensor made costs the host ~10-30 us, a fair part of a short prompt's TTFT)."""
        key = (batch, sampling.temperature, sampling.top_k, sampling.top_p)
        fixed = self._row_tensors.get(key)
        if fixed is None:
            if len(self._row_tensors) >= 64:
                self._row_tensors.clear()
            device = self.rt.device
            fixed = self._row_tensors[key] = (
                torch.full((batch,), sampling.temperature, dtype=torch.float32, device=device),
                torch.full((batch,), sampling.top_k, dtype=torch.int32, device=device),
                torch.full((batch,), sampling.top_p, dtype=torch.float32, device=device),
                torch.zeros(batch, dtype=torch.int64, device=device),  # RNG offsets: none used yet
                torch.arange(batch, dtype=torch.int32, device=device))  # slot i serves item i
        seeds = self.device_tensor(item_seeds(sampling, batch), torch.int64)
        temperature, top_k, top_p, offsets, slots = fixed
        return temperature, top_k, top_p, seeds, offsets, slots

    def device_tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A list (of lists) as a tensor on the device, copied from pinned memory without waiting."""
        cuda = self.rt.device.type == "cuda"
        return torch.tensor(values, dtype=dtype, pin_memory=cuda).to(self.rt.device, non_blocking=cuda)

    def generate(self, prompts: list[list[int]], adapters: list[str], sampling: SamplingSettings,
                  stops: list[str], max_new: int, on_text: TextCallback | None, reuse: KVReuseStats | None,
                  spec: Speculation | None, images: list[ImagePrompt | None]):
        runner, device = self.rt.runner, self.rt.device
        batch = len(prompts)
        text_each_step = bool(stops or on_text)  # stop strings or streaming: detokenize as tokens come
        rows = [GenerationRow(len(p), RowText(self.rt.tokenizer.decode, stops, on_text is not None) if text_each_step
                              else None) for p in prompts]
        timings = GenerationTimings()

        t0 = time.perf_counter()
        # Slot i serves item i. With KV reuse on, each slot first gets the longest saved prefix of its
        # prompt, and only the rest is prefilled. Image tokens are keyed by their image's digest
        # (multimodal.py). Each prompt's block keys are hashed once, for the restore and the save.
        # Text prompts leave the memory tiers' blocks to the prefill step, which copies them itself.
        text = all(im is None for im in images)
        block_keys = cached = None
        pool_blocks = host_blocks = ()
        if reuse is not None:
            block_keys = [self.rt.kv_store.keys(im.key_ids if im is not None else p,
                                             runner.prefix_fingerprint(a, len(p)))
                          for p, im, a in zip(prompts, images, adapters)]
            cached = [self.rt.kv_store.restore(i, len(p), k, reuse, defer=text)
                      for i, (p, k) in enumerate(zip(prompts, block_keys))]
            pool_blocks, host_blocks = self.rt.kv_store.take_pending()
            reuse.restore_ms += (time.perf_counter() - t0) * 1e3
        if text:
            # The ids go to the GPU with the step's other integers, embedded inside the prefill graph.
            logits = runner.prefill_tokens(prompts, lora=adapters, cached_lengths=cached, pool_blocks=pool_blocks,
                                           host_blocks=host_blocks)
        else:
            cached = cached or [0] * batch
            width = max(len(p) - c for p, c in zip(prompts, cached))
            ids = self.device_tensor([p[c:] + [0] * (width - len(p) + c) for p, c in zip(prompts, cached)],
                                      torch.int64)
            embeds = runner.embed(ids)
            positions = offsets_mm = None
            timings.vision_ms = self.rt.vision.write_embeddings(embeds, images, cached)
            if self.rt.config.mrope_section is not None:
                positions, offsets_mm = prefill_positions(prompts, images, cached, ids.shape[1])
            logits = runner.prefill_step(embeds, [len(p) for p in prompts], lora=adapters, cached_lengths=cached,
                                         positions=positions, position_offsets=offsets_mm)
        # Queued behind the prefill, so the host work here runs while the GPU prefills.
        temperature, top_k, top_p, seeds, offsets, slots = self.sampling_tensors(sampling, batch)
        tokens = runner.sample(logits, temperature, top_k, top_p, seeds, offsets)
        if reuse is not None:
            t_save = time.perf_counter()
            for i, k in enumerate(block_keys):
                self.rt.kv_store.save(i, k, reuse)
            reuse.save_ms += (time.perf_counter() - t_save) * 1e3
        active = list(range(batch))
        first = tokens.tolist()
        if reuse is not None:
            self.account_prefill(reuse, sum(len(p) - c for p, c in zip(prompts, cached)), t0)
        advance_rows(rows, active, [[t] for t in first], self.rt.eos_token_ids, max_new, on_text)
        if spec is not None:
            spec.start(first)
        timings.prefill_ms = (time.perf_counter() - t0) * 1e3 - timings.vision_ms

        t1 = time.perf_counter()
        active = [i for i in active if rows[i].finish_reason is None]
        # Steps run one ahead where nothing on the host decides the next step's input: step n + 1 is
        # queued before step n's tokens are read, so the host's work (stop strings, streaming) hides
        # behind the GPU's. A row that finishes at step n has step n + 1 computed and dropped.
        ahead = spec is None and not runner.needs_rows_each_step and runner.switches.run_ahead
        in_flight: collections.deque = collections.deque()  # (the rows of a queued step, its tokens)
        try:  # an exception from on_text, or a KeyboardInterrupt, must not leave the batch running
            if active:
                keep = torch.tensor(active, device=device)
                runner.start_decode(tokens[keep], slots[keep], temperature[keep], top_k[keep], top_p[keep],
                                    seeds[keep], offsets[keep], lora=[adapters[i] for i in active])
            while active:
                if not ahead:
                    if runner.needs_rows_each_step:
                        runner.prepare_decode_rows(active, [prompts[i] for i in active], [rows[i].ids for i in active],
                                                   [adapters[i] for i in active])
                    stepped, new_tokens = active, self.decode_step(active, rows, max_new, spec)
                else:
                    while len(in_flight) < 2:
                        in_flight.append((active, runner.decode_launch()))
                    stepped, pending = in_flight.popleft()
                    new_tokens = [[t] for t in pending.wait()]
                timings.decode_tokens += advance_rows(rows, stepped, new_tokens, self.rt.eos_token_ids, max_new, on_text)
                still = [i for i in active if rows[i].finish_reason is None]
                if still and len(still) != len(active):  # rows that finished leave the batch
                    runner.keep_decode_rows([active.index(i) for i in still])
                active = still
        finally:
            runner.end_decode()
        timings.decode_ms = (time.perf_counter() - t1) * 1e3

        for row in rows:
            if row.live_text is not None:
                row.text = row.live_text.text
            elif self.rt.tokenizer is not None:
                row.text = self.rt.tokenizer.decode(row.ids)
        return rows, timings

    def account_prefill(self, reuse: KVReuseStats, prefilled: int, started: float) -> None:
        """The prefill the reused tokens saved (PrefillRate). Called once the first tokens are on the
        host (no synchronisation of its own: that would keep the saving's host work from overlapping
        the prefill)."""
        elapsed_ms = (time.perf_counter() - started) * 1e3
        self.prefill_rate.account(reuse, prefilled, elapsed_ms, max(elapsed_ms - reuse.restore_ms, 0.0))

    def decode_step(self, active: list[int], rows: list[GenerationRow], max_new: int,
                     spec: Speculation | None) -> list[list[int]]:
        """One decode step of the running batch: each active row's new tokens (one, or with
        speculation the accepted drafts plus one)."""
        runner = self.rt.runner
        trees = None
        if spec is not None:
            began = time.perf_counter()
            budgets = [min(max_new - len(rows[i].ids),
                           runner.max_tree_drafts(rows[i].prompt_len, rows[i].prompt_len + len(rows[i].ids)))
                       for i in active]
            trees = spec.propose(active, budgets)
            spec.stats.propose_ms += (time.perf_counter() - began) * 1e3
        if trees is None:
            new_tokens = [[t] for t in runner.decode_sample_step().tolist()]
            if spec is not None:
                spec.record(active, new_tokens)
            return new_tokens
        host = runner.verify_sample_trees([(t.tokens, t.parents) if t is not None else ([0], [-1])
                                           for t in trees]).tolist()  # one copy to the host
        accepted = [row[-1] for row in host]
        new_tokens = [row[:n + 1] for row, n in zip(host, accepted)]
        spec.record(active, new_tokens, trees, accepted)
        return new_tokens
