"""Mixed steps: the running decode batch's next token and a chunk of waiting prompts in one forward
(model.forward_mixed), so the chunk's tokens ride on the decode step's weight reads instead of a
prefill of their own between two decode steps. The continuous-batching loop (serving/engine_loop.py)
prefills admitted prompts this way while rows decode: the running rows' inter-token time then grows
by the chunk's share of one step, not by a whole prefill.

A step samples the decode rows' tokens (as decode_sample_step does, into the decode buffers: the next
step's input) and each chunk row's first token (RNG offset 0, its own settings; meaningful for the rows
whose prompt ends in the chunk), and queues one copy of both to pinned host memory (PendingTokens, as
decode_launch): it composes with run-ahead. Replayed from a CUDA graph per MixedKey; a graph for
decode buffers that hold live rows is captured with those rows set aside (DecodeSteps.rows_set_aside).
MixedSteps receives the engine's state, adapters, graph registry and decode steps; it owns the chunk
buffers."""

from __future__ import annotations

from array import array

import torch

from ..errors import InvalidRequestError
from ..kernels.lora import used_slot_list
from .adapters import Adapters, any_adapter
from .decode_steps import DecodeSteps, PendingTokens
from ..progress import progress
from .graphs import MixedBuffers, MixedKey, StepGraphs, graph_batch_sizes, prefill_bucket
from .model import Part
from .prefill_steps import _id_arrays, _int_list, _zeros, prefill_rows
from .state import EngineState


class MixedSteps:
    def __init__(self, state: EngineState, adapters: Adapters, graphs: StepGraphs, decode: DecodeSteps,
                 chunk_size: int):
        self.state, self.adapters, self.graphs, self.decode = state, adapters, graphs, decode
        self.chunk_size = chunk_size  # the most tokens a chunk row takes (the prefill chunk)
        self.buffers: dict[tuple[int, int, int], MixedBuffers] = {}  # by (rows, length, decode size)

    @property
    def available(self) -> bool:
        """Whether this engine takes mixed steps: not where a prompt's positions need per-slot RoPE
        offsets (LongRoPE, multimodal RoPE), which forward_mixed does not carry."""
        return self.state.rope.offsets is None and self.state.rope.sections is None

    def mixed_launch(self, prompts: list[list[int]], slots, cached_lengths, lora, temperature, top_k, top_p,
                     seeds) -> PendingTokens:
        """One decode step of the running rows (decode_launch's) with, in the same forward, the next
        chunk of `prompts` (token ids up to the chunk's end; `cached_lengths`: how many of each are in
        its slot already, the rest is prefilled now, at most prefill_chunk_size tokens a row) into
        `slots` (none of them a running row's), with adapters `lora` (prefill_tokens'). temperature,
        top_k, top_p, seeds: each chunk row's first-token sampling (RNG offset 0). Returns at once;
        .wait() gives the chunk rows' first tokens, then the decode rows' tokens."""
        dbuf = self.decode.running("mixed_launch")
        if not self.available:
            raise InvalidRequestError("this engine takes no mixed steps (LongRoPE or multimodal RoPE): prefill apart")
        cfg = self.state.config
        rows = len(prompts)
        lengths = [len(p) for p in prompts]
        cached, new = prefill_rows(cfg, rows, max(lengths, default=0), lengths,
                                   [0] * rows if cached_lengths is None else cached_lengths,
                                   cfg.max_supported_input_length)
        slot_ids = _int_list(slots)
        if len(slot_ids) != rows or len(set(slot_ids)) != rows or \
                not all(0 <= s < cfg.max_supported_batch_size for s in slot_ids):
            raise InvalidRequestError(f"mixed_launch: {rows} distinct slots in [0, {cfg.max_supported_batch_size})")
        if dbuf.slots_host is not None and set(slot_ids) & set(dbuf.slots_host[:dbuf.live_rows]):
            raise InvalidRequestError("mixed_launch: a chunk row's slot is a running decode row's")
        width = max(new)
        if width > self.chunk_size:
            raise InvalidRequestError(f"mixed_launch: at most {self.chunk_size} new tokens a row (the prefill chunk)")
        top_k, seeds = _int_list(top_k), _int_list(seeds)
        temperature, top_p = [float(t) for t in temperature], [float(p) for p in top_p]
        if any(len(v) != rows for v in (temperature, top_p, top_k, seeds)):
            raise InvalidRequestError("mixed_launch: one sampling setting of each kind per prompt")
        lora_rows = self.adapters.rows(lora, rows)
        uses_lora = any_adapter(dbuf.lora_host + lora_rows)
        ids = _id_arrays([p[c:] for p, c in zip(prompts, cached)], self.state.weights.embed.shape[0])
        key = MixedKey(dbuf.size, rows, prefill_bucket(width), uses_lora, self.state.processing_active,
                       self.state.logprobs_active)
        mbuf = self._buffers(rows, key.length, dbuf.size)
        graph = self._graph(key, dbuf, mbuf)
        # The chunk's integers in MixedBuffers.inputs' layout, one host-to-device copy.
        packed = array("i", array("q", seeds).tobytes())
        packed.frombytes(array("f", temperature + top_p).tobytes())
        packed.extend(top_k + slot_ids + cached + new + lora_rows
                      + used_slot_list(dbuf.lora_host + lora_rows, self.adapters.capacity))
        for row in ids:
            packed.extend(row)
            packed.extend(_zeros(key.length - len(row)))
        host = torch.frombuffer(packed, dtype=torch.int32)
        if self.state.device.type == "cuda":
            host = host.pin_memory()
        mbuf.inputs.copy_(host, non_blocking=True)
        if graph is not None:
            graph.replay()
        else:  # eager: the chunk's own width, no padding computed
            self._body(dbuf, mbuf, uses_lora, width, key.processing, key.logprobs)
        return self.decode.pending(mbuf.tokens[:rows + dbuf.live_rows],
                                   mbuf.logprobs[:rows + dbuf.live_rows] if key.logprobs else None)

    def _buffers(self, rows: int, length: int, size: int) -> MixedBuffers:
        buf = self.buffers.get((rows, length, size))
        if buf is None:
            buf = MixedBuffers(rows, length, size, self.state.kv_cache.scratch_slot, self.state.device,
                               self.adapters.capacity)
            self.buffers[rows, length, size] = buf
        return buf

    def _graph(self, key: MixedKey, dbuf, mbuf: MixedBuffers):
        graph = self.graphs.get(key)
        if graph is None and self.graphs.enabled:
            # Warm-up and capture with every decode and chunk row on the scratch slot: no request's
            # cache is touched, and the running rows are put back after.
            with self.decode.rows_set_aside(dbuf):
                mbuf.reset()
                graph = self.graphs.capture(key, lambda: self._body(dbuf, mbuf, key.lora, None, key.processing,
                                                                    key.logprobs))
        return graph

    def capture_graphs(self, budget: int, lora: bool = False) -> list[MixedKey]:
        """Capture up front the graphs of one-row chunks of up to `budget` tokens (every length bucket)
        beside every padded decode batch size (lora=True: those of batches with adapters too): a step
        whose graph is missing captures it first, and the running rows wait that long. Returns the keys."""
        if not self.graphs.enabled or not self.available:
            return []
        most = min(budget, self.chunk_size)
        lengths = sorted({prefill_bucket(n) for n in range(1, most + 1)})
        keys = [MixedKey(size, 1, length, uses)
                for size in graph_batch_sizes(self.state.config.max_supported_batch_size)
                for length in lengths for uses in ((False, True) if lora and self.adapters.stacks else (False,))]
        for key in progress(keys, desc="capturing mixed-step graphs", unit="graph"):
            self._graph(key, self.decode._buffers(key.size), self._buffers(1, key.length, key.size))
        return keys

    def _body(self, dbuf, mbuf: MixedBuffers, uses_lora: bool, width: int | None = None,
              processing: bool = False, logprobs: bool = False) -> None:
        """One mixed step on `dbuf` and `mbuf`, device work only (what a graph captures); width: the chunk
        tokens of each row computed (None: the buffers' whole length, as a graph must); processing: with
        the rows' logit processing (engine/logit_processing.py; the chunk rows' first tokens are counted
        when they join, on the host: only the rows whose prompt ends in the chunk keep theirs); logprobs:
        writing every row's logprobs (mbuf.logprobs, in mbuf.tokens' order)."""
        state = self.state
        lengths = state.kv_cache.lengths
        scratch = state.kv_cache.scratch_slot
        lengths[scratch:scratch + 1].zero_()  # the decode padding rows restart at position 0 (decode_steps.py)
        starts = lengths[dbuf.slot_index]
        ids = mbuf.ids[:, :width]
        parts = [Part(state.embed(dbuf.tokens)[:, None], dbuf.slots, starts, dbuf.q_lens),
                 Part(state.embed(ids), mbuf.slots, mbuf.starts, mbuf.q_lens)]
        lora = self.adapters.batch(torch.cat([dbuf.lora, mbuf.lora.repeat_interleave(ids.shape[1])]),
                                   mbuf.lora_used, uses_lora) if uses_lora else None
        logits = state.forward_mixed(parts, lora)
        lengths[dbuf.slot_index] = starts + 1
        lengths[mbuf.slots.long()] = mbuf.starts + mbuf.q_lens
        size, rows = dbuf.size, mbuf.rows
        dbuf.offsets += 1
        dbuf.tokens.copy_(state.sample(logits[:size], dbuf.temperature, dbuf.top_k, dbuf.top_p, dbuf.seeds,
                                       dbuf.offsets, slots=dbuf.slots if processing else None, count=True,
                                       logprobs=dbuf.logprobs if logprobs else None))
        dbuf.logits = logits[:size]
        mbuf.tokens[:rows].copy_(state.sample(logits[size:], mbuf.temperature, mbuf.top_k, mbuf.top_p, mbuf.seeds,
                                              mbuf.first_offsets, slots=mbuf.slots if processing else None,
                                              logprobs=mbuf.logprobs[:rows] if logprobs else None))
        mbuf.tokens[rows:].copy_(dbuf.tokens)
        if logprobs:
            mbuf.logprobs[rows:].copy_(dbuf.logprobs)
