"""LLMEngineRunner: owns one model's weights, KV cache and RoPE cache; runs prefill and decode steps.

Mirrors the seeds' engine runner: the runtime hands it input embeddings and gets logits back;
it knows nothing of text or requests. Rows of a batch live in KV-cache *slots*; a decode step runs
any subset of slots, so rows that finish can leave the batch without moving anyone's cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..kernels import ops, rope_inv_freq
from ..errors import ConfigurationError, InvalidRequestError
from .config import EngineConfig
from .kv_cache import LinearKVCache
from .model import forward_logits
from .weights import load_weights

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
                 max_input_length: int | None = None, max_kv_cache_capacity: int | None = None):
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
        return torch.as_tensor(slots, dtype=torch.int32).to(self.device)

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
        starts = torch.zeros(batch, dtype=torch.int32, device=self.device)
        q_lens = lengths_host.to(device=self.device, dtype=torch.int32)
        logits = forward_logits(self.weights, cfg, self.kv_cache, self.rope_cos_sin,
                                inputs_embeds.to(self.dtype), slot_ids, starts, q_lens)
        self.kv_cache.lengths[slot_ids.long()] = q_lens
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
