"""LLMEngineRunner: owns one model's weights, KV cache and RoPE cache; runs prefill and decode steps.

Mirrors the seeds' engine runner: the runtime hands it input embeddings and gets logits back;
it knows nothing of text or requests. Rows of a batch live in KV-cache *slots*; a decode step runs
any subset of slots, so rows that finish can leave the batch without moving anyone's cache.

The fast decode path is `start_decode(...)` then `decode_sample_step()` per token: embedding, all
layers, LM head and sampling run from static buffers with no host synchronisation, replayed from a
CUDA graph per padded batch size (see graphs.py); `decode_step` is the seeds' eager
embeddings-in, logits-out step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..kernels import ops, rope_inv_freq
from ..errors import ConfigurationError, InvalidRequestError
from .config import EngineConfig
from .graphs import DecodeBuffers, PrefillBuffers, StepGraphs, graph_batch_sizes, prefill_bucket
from .kv_cache import LinearKVCache
from .model import forward_logits
from .weights import load_weights

DEFAULT_PREFILL_CHUNK = 2048  # prompts longer than this are prefilled chunk by chunk

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigurationError(f"bad device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("device 'cuda' was asked for but torch sees no CUDA GPU")
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigurationError(f"unsupported device {device!r}: use 'cpu' or 'cuda'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ConfigurationError(f"unsupported dtype {dtype!r}; use float32, float16 or bfloat16")


class LLMEngineRunner:
    def __init__(self, model_dir: str | Path, *, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, max_batch_size: int | None = None,
                 max_input_length: int | None = None, max_kv_cache_capacity: int | None = None,
                 cuda_graphs: bool = True, prefill_chunk_size: int | None = None):
        """cuda_graphs: replay decode steps from CUDA graphs (on CUDA; eager elsewhere or when False).
        prefill_chunk_size: prompts longer than this are prefilled in chunks of it (default 2048)."""
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.config = EngineConfig.from_model_dir(
            self.model_dir, max_batch_size=max_batch_size, max_input_length=max_input_length,
            max_kv_cache_capacity=max_kv_cache_capacity)
        cfg = self.config
        self.weights = load_weights(self.model_dir, cfg, dtype=self.dtype, device=self.device)
        self.kv_cache = LinearKVCache(
            num_layers=cfg.num_decoder_layers, max_batch_size=cfg.max_supported_batch_size,
            num_kv_heads=cfg.num_kv_heads, capacity=cfg.max_kv_cache_capacity, head_dim=cfg.head_dim,
            dtype=self.dtype, device=self.device)
        inv_freq = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling).to(self.device)
        self.rope_cos_sin = ops.rope_cos_sin_cache(inv_freq, cfg.max_kv_cache_capacity)
        chunk = DEFAULT_PREFILL_CHUNK if prefill_chunk_size is None else prefill_chunk_size
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ConfigurationError(f"prefill_chunk_size must be a positive integer, got {prefill_chunk_size!r}")
        self.prefill_chunk_size = chunk
        self.graphs = StepGraphs(self.device, enabled=cuda_graphs)
        self._decode_buffers: dict[int, DecodeBuffers] = {}
        self._prefill_buffers: dict[tuple[int, int], PrefillBuffers] = {}
        self._active: DecodeBuffers | None = None
        self.lora_key = ""  # the active LoRA configuration: part of every graph key

    # Accessors named after the seeds' API.
    def get_engine_config(self) -> EngineConfig:
        return self.config

    def get_linear_kv_cache(self) -> LinearKVCache:
        return self.kv_cache

    def get_rope_cos_sin_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope_cos_sin

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [...] -> input embeddings [..., hidden] in the engine dtype."""
        return torch.nn.functional.embedding(input_ids.to(self.device), self.weights.embed)

    def _slots(self, slots, batch: int) -> torch.Tensor:
        if slots is None:
            return torch.arange(batch, dtype=torch.int32, device=self.device)
        slots = torch.as_tensor(slots, dtype=torch.int32)
        if not slots.is_cuda:  # host-side check is free here (device tensors are the caller's to get right)
            if slots.shape != (batch,) or slots.unique().numel() != batch or slots.min() < 0 \
                    or slots.max() >= self.config.max_supported_batch_size:
                raise InvalidRequestError(f"slots must be {batch} distinct values in "
                                          f"[0, {self.config.max_supported_batch_size})")
        return slots.to(self.device)

    def prefill_step(self, inputs_embeds: torch.Tensor, context_lengths, slots=None) -> torch.Tensor:
        """Start new sequences: clears the given slots (default 0..B-1), fills their KV cache with
        the prompt and returns the last prompt token's logits, [B, vocab] float32.

        inputs_embeds: [B, S, hidden], right-padded; context_lengths: [B] (list or tensor).
        """
        cfg = self.config
        batch, seq, hidden = inputs_embeds.shape
        lengths_host = torch.as_tensor(context_lengths, dtype=torch.int64).cpu()
        if batch > cfg.max_supported_batch_size:
            raise InvalidRequestError(f"batch of {batch} exceeds max_batch_size {cfg.max_supported_batch_size}")
        if hidden != cfg.hidden_size or lengths_host.shape != (batch,):
            raise InvalidRequestError(f"inputs_embeds must be [B, S, {cfg.hidden_size}] with B context lengths")
        if lengths_host.min() < 1 or lengths_host.max() > min(seq, cfg.max_supported_input_length):
            raise InvalidRequestError(f"context lengths must be in [1, {min(seq, cfg.max_supported_input_length)}]")
        slot_ids = self._slots(slots, batch)
        embeds = inputs_embeds.to(self.dtype)
        chunk = self.prefill_chunk_size
        logits = None
        for begin in range(0, int(lengths_host.max()), chunk):
            # Row b contributes tokens [begin, begin + chunk) of its prompt (none once it has ended);
            # its logits come from the chunk that holds its last token.
            q_host = (lengths_host - begin).clamp(0, chunk)
            starts = torch.full((batch,), begin, dtype=torch.int32, device=self.device)
            q_lens = q_host.to(device=self.device, dtype=torch.int32)
            part = self._prefill_chunk(embeds[:, begin:begin + chunk], slot_ids, starts, q_lens)
            ends_here = ((lengths_host > begin) & (lengths_host <= begin + chunk)).to(self.device)
            logits = part if logits is None else torch.where(ends_here[:, None], part, logits)
        self.kv_cache.lengths[slot_ids.long()] = lengths_host.to(device=self.device, dtype=torch.int32)
        return logits

    def decode_step(self, inputs_embeds: torch.Tensor, slots=None) -> torch.Tensor:
        """Append one token per row: inputs_embeds [b, 1, hidden] for cache slots `slots`
        (default 0..b-1). Returns the new logits, [b, vocab] float32."""
        if inputs_embeds.dim() == 2:
            inputs_embeds = inputs_embeds[:, None]
        batch = inputs_embeds.shape[0]
        slot_ids = self._slots(slots, batch)
        starts = self.kv_cache.lengths[slot_ids.long()]
        q_lens = torch.ones(batch, dtype=torch.int32, device=self.device)
        logits = forward_logits(self.weights, self.config, self.kv_cache, self.rope_cos_sin,
                                inputs_embeds.to(self.dtype), slot_ids, starts, q_lens)
        self.kv_cache.lengths[slot_ids.long()] = starts + 1
        return logits

    def _prefill_chunk(self, embeds, slots, starts, q_lens) -> torch.Tensor:
        """One prefill chunk: replayed from a graph of its (rows, length bucket) where graphs are on."""
        if not self.graphs.enabled:
            return forward_logits(self.weights, self.config, self.kv_cache, self.rope_cos_sin, embeds, slots,
                                  starts, q_lens)
        rows, width, hidden = embeds.shape
        key = (rows, prefill_bucket(width), self.lora_key, "prefill")
        buf = self._prefill_buffers.get(key[:2])
        if buf is None:
            buf = PrefillBuffers(rows, key[1], hidden, self.dtype, self.kv_cache.scratch_slot, self.device)
            self._prefill_buffers[key[:2]] = buf
        if self.graphs.get(key) is None:
            # Warm-up and capture with every row on the scratch slot: no request's cache is touched.
            buf.slots.fill_(self.kv_cache.scratch_slot)
            buf.starts.zero_()
            buf.q_lens.fill_(1)
            self.graphs.capture(key, lambda: self._prefill_body(buf))
        buf.load(embeds, slots, starts, q_lens)
        self.graphs.get(key).replay()
        return buf.logits.clone()  # the next replay of this graph overwrites buf.logits

    def _prefill_body(self, buf: PrefillBuffers) -> None:
        buf.logits = forward_logits(self.weights, self.config, self.kv_cache, self.rope_cos_sin, buf.embeds,
                                    buf.slots, buf.starts, buf.q_lens)

    # ---- the fast decode path: static buffers, sampling inside the step, CUDA graphs ----

    def _padded_size(self, rows: int) -> int:
        if not self.graphs.enabled:
            return rows
        return next(size for size in graph_batch_sizes(self.config.max_supported_batch_size) if size >= rows)

    def _buffers(self, size: int) -> DecodeBuffers:
        if size not in self._decode_buffers:
            self._decode_buffers[size] = DecodeBuffers(size, self.kv_cache.scratch_slot, self.device)
        return self._decode_buffers[size]

    def _graph_key(self, size: int):
        return (size, self.lora_key, "decode")

    def _decode_body(self, buf: DecodeBuffers) -> None:
        """One decode step on `buf`, device work only: what a graph captures."""
        lengths = self.kv_cache.lengths
        scratch = self.kv_cache.scratch_slot
        lengths[scratch:scratch + 1].zero_()  # padding rows restart at position 0 every step (no host scalar:
        # a CPU value copied in would be illegal while a graph is captured)
        starts = lengths[buf.slot_index]
        embeds = torch.nn.functional.embedding(buf.tokens, self.weights.embed)[:, None]
        logits = forward_logits(self.weights, self.config, self.kv_cache, self.rope_cos_sin, embeds,
                                buf.slots, starts, buf.q_lens)
        lengths[buf.slot_index] = starts + 1
        buf.offsets += 1
        buf.tokens.copy_(ops.sample(logits, buf.temperature, buf.top_k, buf.top_p, buf.seeds, buf.offsets))
        buf.logits = logits

    def capture_decode_graphs(self, batch_sizes=None) -> list[int]:
        """Capture decode graphs up front for these batch sizes (default: every padded size up to
        max_batch_size); sizes are rounded up to the padded sizes. Returns the sizes captured."""
        if not self.graphs.enabled:
            return []
        wanted = graph_batch_sizes(self.config.max_supported_batch_size) if batch_sizes is None else batch_sizes
        sizes = []
        for rows in wanted:
            if not 1 <= int(rows) <= self.config.max_supported_batch_size:
                raise InvalidRequestError(f"batch size {rows} is outside 1..{self.config.max_supported_batch_size}")
            size = self._padded_size(int(rows))
            self._ensure_graph(size)
            sizes.append(size)
        return sorted(set(sizes))

    def _ensure_graph(self, size: int) -> None:
        key = self._graph_key(size)
        if not self.graphs.enabled or self.graphs.get(key) is not None:
            return
        buf = self._buffers(size)
        if buf is self._active:
            raise RuntimeError("cannot capture a graph for the buffers of the running decode batch")
        empty = torch.empty(0, dtype=torch.int64, device=self.device)
        buf.load(tokens=empty, slots=empty, temperature=empty, top_k=empty, top_p=empty, seeds=empty, offsets=empty)
        # Warm-up and capture touch only the scratch slot: every row of `buf` is padding here.
        self.graphs.capture(key, lambda: self._decode_body(buf))

    def start_decode(self, tokens, slots, temperature, top_k, top_p, seeds, offsets) -> None:
        """Set the rows of the next decode steps. Per row (all [n], device tensors or lists): the last
        token (input of the next step), its KV-cache slot, sampling temperature / top_k / top_p, seed,
        and the RNG offset used last (each step advances it by one before drawing)."""
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
        self._load_rows(rows)

    def keep_decode_rows(self, keep) -> None:
        """Continue decoding only rows `keep` (indices into the current rows, in order): finished
        rows leave the batch, which moves to the smallest padded size that holds the rest."""
        if self._active is None:
            raise RuntimeError("keep_decode_rows before start_decode")
        keep = list(keep)
        if any(not 0 <= i < self._active.live for i in keep):
            raise InvalidRequestError(f"keep_decode_rows: indices must be in [0, {self._active.live})")
        self._load_rows(self._active.rows(torch.as_tensor(keep, dtype=torch.int64, device=self.device)))

    def _load_rows(self, rows: dict) -> None:
        size = self._padded_size(rows["slots"].shape[0])
        self._active = None
        self._ensure_graph(size)
        buf = self._buffers(size)
        buf.load(**rows)
        self._active = buf

    def decode_sample_step(self) -> torch.Tensor:
        """One decode step of the rows set by start_decode: returns their sampled tokens, [n] int64 on
        the device (a view of the static buffer, overwritten by the next step)."""
        buf = self._active
        if buf is None:
            raise RuntimeError("decode_sample_step before start_decode")
        graph = self.graphs.get(self._graph_key(buf.size))
        if graph is not None:
            graph.replay()
        else:
            self._decode_body(buf)
        return buf.tokens[:buf.live]

    def decode_logits(self) -> torch.Tensor:
        """The last decode_sample_step's logits of the live rows, [n, vocab] float32."""
        buf = self._active
        if buf is None or buf.logits is None:
            raise RuntimeError("no decode step has run")
        return buf.logits[:buf.live]
