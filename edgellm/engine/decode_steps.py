"""The fast decode path of LLMEngineRunner (a mixin: the state is the runner's): the running batch's
rows in static buffers (graphs.py DecodeBuffers), sampling inside the step, one CUDA graph per padded
batch size and LoRA on/off. start_decode sets the rows; decode_sample_step advances them all by one
token; keep_decode_rows drops finished rows; restart_decode_rows points the same rows elsewhere."""

from __future__ import annotations

import torch

from ..errors import InvalidRequestError
from ..kernels import ops
from ..kernels.lora import used_slots
from ..progress import progress
from .graphs import DecodeBuffers, any_adapter, graph_batch_sizes
from .model import forward_logits
from .persistent import persistent_logits
from .modes import inference_call


class DecodeSteps:

    def _padded_size(self, rows: int) -> int:
        if not self.graphs.enabled:
            return rows
        return next(size for size in graph_batch_sizes(self.config.max_supported_batch_size) if size >= rows)

    def _buffers(self, size: int) -> DecodeBuffers:
        if size not in self._decode_buffers:
            self._decode_buffers[size] = DecodeBuffers(size, self.kv_cache.scratch_slot, self.device,
                                                       self._lora_capacity())
        return self._decode_buffers[size]

    def _persistent(self, size: int, uses_lora: bool) -> bool:
        """This step runs the persistent kernel (engine/persistent.py) rather than the chain."""
        return self.persistent is not None and size == 1 and not uses_lora

    def _graph_key(self, size: int, uses_lora: bool):
        return (size, _lora_key(uses_lora), "persistent" if self._persistent(size, uses_lora) else "decode")

    def _decode_body(self, buf: DecodeBuffers, uses_lora: bool) -> None:
        """One decode step on `buf`, device work only: what a graph captures."""
        lengths = self.kv_cache.lengths
        scratch = self.kv_cache.scratch_slot
        lengths[scratch:scratch + 1].zero_()  # padding rows restart at position 0 every step (no host scalar:
        # a CPU value copied in would be illegal while a graph is captured)
        starts = lengths[buf.slot_index]
        embeds = torch.nn.functional.embedding(buf.tokens, self.weights.embed)[:, None]
        if self._persistent(buf.size, uses_lora):
            logits = persistent_logits(self.persistent, self.weights, self.config, self.rope, embeds, buf.slots, starts,
                                       ops)
        else:
            logits = forward_logits(self.weights, self.config, self.kv_cache, self.rope, embeds, buf.slots, starts,
                                    buf.q_lens, lora=self._lora_batch(buf.lora, buf.lora_used, uses_lora))
        lengths[buf.slot_index] = starts + 1
        buf.offsets += 1
        buf.tokens.copy_(self.full_ids(ops.sample(logits, buf.temperature, buf.top_k, buf.top_p, buf.seeds,
                                                  buf.offsets)))
        buf.logits = logits

    @inference_call
    def capture_decode_graphs(self, batch_sizes=None, lora: bool = False) -> list[int]:
        """Capture decode graphs up front for these batch sizes (default: every padded size up to
        max_batch_size); sizes are rounded up to the padded sizes. lora=True captures the graphs of
        batches that use adapters (any mix; the base-model graphs are separate). Returns the sizes."""
        if not self.graphs.enabled:
            return []
        wanted = graph_batch_sizes(self.config.max_supported_batch_size) if batch_sizes is None else batch_sizes
        sizes = []
        for rows in progress(wanted, desc="capturing decode graphs", unit="graph"):
            if not 1 <= int(rows) <= self.config.max_supported_batch_size:
                raise InvalidRequestError(f"batch size {rows} is outside 1..{self.config.max_supported_batch_size}")
            size = self._padded_size(int(rows))
            self._ensure_graph(size, bool(lora) and self.lora is not None)
            sizes.append(size)
        return sorted(set(sizes))

    def _ensure_graph(self, size: int, uses_lora: bool) -> None:
        key = self._graph_key(size, uses_lora)
        if not self.graphs.enabled or self.graphs.get(key) is not None:
            return
        buf = self._buffers(size)
        if buf is self._active:
            raise RuntimeError("cannot capture a graph for the buffers of the running decode batch")
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        buf.load(tokens=empty, slots=empty, temperature=empty, top_k=empty, top_p=empty, seeds=empty, offsets=empty,
                 lora=empty)
        buf.lora_used.zero_()
        # Warm-up and capture touch only the scratch slot: every row of `buf` is padding here.
        self.graphs.capture(key, lambda: self._decode_body(buf, uses_lora))
        self._ensure_verify_graphs(buf, uses_lora)

    @inference_call
    def start_decode(self, tokens, slots, temperature, top_k, top_p, seeds, offsets, lora=None) -> None:
        """Set the rows of the next decode steps. Per row (all [n], device tensors or lists): the last
        token (input of the next step), its KV-cache slot, sampling temperature / top_k / top_p, seed,
        and the RNG offset used last (each step advances it by one before drawing). lora: one
        adapter name per row ("" = none), or None for the active adapter on every row."""
        device = self.device
        as_t = lambda x, dtype: torch.as_tensor(x, dtype=dtype).to(device)  # noqa: E731
        rows = dict(tokens=as_t(tokens, torch.int64), slots=as_t(slots, torch.int32),
                    temperature=as_t(temperature, torch.float32), top_k=as_t(top_k, torch.int32),
                    top_p=as_t(top_p, torch.float32), seeds=as_t(seeds, torch.int64),
                    offsets=as_t(offsets, torch.int64))
        n = rows["slots"].shape[0]
        if not 1 <= n <= self.config.max_supported_batch_size:
            raise InvalidRequestError(f"decode batch of {n} rows is outside 1..{self.config.max_supported_batch_size}")
        if any(v.shape != (n,) for v in rows.values()):
            raise InvalidRequestError("start_decode: every per-row argument must have one entry per row")
        lora_rows = self._lora_rows(lora, n)
        rows["lora"] = torch.tensor(lora_rows, dtype=torch.int32, device=device)
        self._load_rows(rows, lora_rows)

    @inference_call
    def restart_decode_rows(self, tokens, lengths=None) -> None:
        """Point the running decode batch's rows (start_decode's: same slots and settings) at new
        input tokens ([n], a list or a device tensor) and, if given, set their slots' cache lengths
        ([n]; e.g. a draft model rewinding to the text it has read). Cheaper than a new start_decode."""
        buf = self._active
        if buf is None:
            raise RuntimeError("restart_decode_rows before start_decode")
        tokens = torch.as_tensor(tokens, dtype=torch.int64)
        if tokens.shape != (buf.live,) or (lengths is not None and len(lengths) != buf.live):
            raise InvalidRequestError(f"restart_decode_rows: {buf.live} tokens (and lengths)")
        buf.tokens[:buf.live].copy_(tokens)
        if lengths is not None:
            self.kv_cache.lengths[buf.slot_index[:buf.live]] = torch.tensor(lengths, dtype=torch.int32).to(self.device)

    @inference_call
    def keep_decode_rows(self, keep) -> None:
        """Continue decoding only rows `keep` (indices into the current rows, in order): finished
        rows leave the batch, which moves to the smallest padded size that holds the rest."""
        if self._active is None:
            raise RuntimeError("keep_decode_rows before start_decode")
        keep = list(keep)
        if any(not 0 <= i < self._active.live for i in keep):
            raise InvalidRequestError(f"keep_decode_rows: indices must be in [0, {self._active.live})")
        lora_rows = [self._active.lora_host[i] for i in keep]
        self._load_rows(self._active.rows(torch.as_tensor(keep, dtype=torch.int64, device=self.device)), lora_rows)

    def _load_rows(self, rows: dict, lora_rows: list[int]) -> None:
        size = self._padded_size(rows["slots"].shape[0])
        self._active = None
        self._ensure_graph(size, any_adapter(lora_rows))
        buf = self._buffers(size)
        buf.load(**rows)
        buf.lora_used.copy_(used_slots(lora_rows, self._lora_capacity(), self.device))
        buf.lora_host = lora_rows
        self._active = buf

    @inference_call
    def end_decode(self) -> None:
        """The decode batch is done: its rows stop holding their adapters (see remove_lora_weights)."""
        self._active = None

    @inference_call
    def decode_sample_step(self) -> torch.Tensor:
        """One decode step of the rows set by start_decode: returns their sampled tokens, [n] int64 on
        the device (a view of the static buffer, overwritten by the next step)."""
        buf = self._active
        if buf is None:
            raise RuntimeError("decode_sample_step before start_decode")
        graph = self.graphs.get(self._graph_key(buf.size, buf.uses_lora))
        if graph is not None:
            graph.replay()
        else:
            self._decode_body(buf, buf.uses_lora)
        return buf.tokens[:buf.live]

    @inference_call
    def decode_launch(self) -> "PendingTokens":
        """decode_sample_step without waiting for it: queues the step and a copy of its tokens to
        pinned host memory, and returns at once. The caller may queue the next step (which reads
        these tokens on the device) before reading these with .wait(): the host's work on step n
        then overlaps the GPU's on step n + 1. At most two may be pending at a time."""
        tokens = self.decode_sample_step()
        if self.device.type != "cuda":
            return PendingTokens(tokens.clone(), None)
        if self._host_tokens is None:
            self._host_tokens = [torch.empty(self.config.max_supported_batch_size, dtype=torch.int64, pin_memory=True)
                                 for _ in range(2)]
        host = self._host_tokens[self._host_turn][:tokens.shape[0]]
        self._host_turn ^= 1
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return PendingTokens(host, done)

    @inference_call
    def decode_logits(self) -> torch.Tensor:
        """The last decode_sample_step's logits of the live rows, [n, vocab] float32."""
        buf = self._active
        if buf is None or buf.logits is None:
            raise RuntimeError("no decode step has run")
        return buf.logits[:buf.live]


class PendingTokens:
    """A queued decode step's sampled tokens (decode_launch)."""

    def __init__(self, host: torch.Tensor, done):
        self._host, self._done = host, done

    def wait(self) -> list[int]:
        """The tokens, once the step and the copy have finished."""
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()


def _lora_key(uses_lora: bool) -> str:
    """The LoRA part of a graph key. Adapters live in fixed stacks and rows pick theirs by a slot
    index in a static buffer, so one graph serves every mix of adapters; only whether the LoRA
    kernels run at all changes the graph."""
    return "lora" if uses_lora else ""
