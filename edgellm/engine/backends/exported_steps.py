"""ExportedSteps: the steps of LLMEngineRunner(export_dir, backend="onnxruntime").

The same prefill_step / prefill_tokens / decode_step as the triton backend's steps (embeddings in,
last-token logits out, rows in KV-cache slots), with the graph `edgellm export` wrote as the engine.
They own what the seeds' runner owns: the LinearKVCache (the graph's past/present key-value inputs
and outputs, bound to the same memory), a logits buffer [max_batch, vocab] and the small per-step
integer tensors; each step binds them to the engine by data pointer (backends/onnxruntime_engine.py;
another engine comes in through _open_engine and _run_decode, as bench/trials/tensorrt does). The
embedding lookup is theirs (embedding.safetensors of the export).

The decode loop LLMInferenceRuntime drives (start_decode, decode_sample_step / decode_launch,
add_decode_rows, keep_decode_rows, end_decode, sample) runs here eagerly: a step is decode_step on the rows' last
tokens, then the sampling kernel, with the triton backend's per-row settings and RNG offsets.

What the exported graph does not have is refused with ConfigurationError: up front, the arguments
LoRA (the base model only), a reduced vocabulary, quantization and speculative verification; then
any other Triton-only runner method (KV block pools, token trees, graph capture...).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ...errors import BackendError, ConfigurationError, InvalidRequestError, LoraError, ModelLoadError
from ...kernels import ops
from ..config import EngineConfig
from ..decode_steps import PendingTokens, decode_rows, joined_rows
from ..devices import resolve_device, resolve_dtype
from ..kv_cache import LinearKVCache
from ..prefill_steps import _int_list, prefill_rows
from ..state import check_slots
from .export_format import engine_matches_config, read_engine_json

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Triton-backend features an exported graph does not have: (runner argument, its "off" value).
_UNSUPPORTED_ARGS = (("lora_weights", None), ("max_lora_rank", None), ("vocab_map", None), ("quantization", None),
                     ("quantize_lm_head", False), ("max_verify_tokens", 0), ("max_loras", None))


class ExportedSteps:
    def __init__(self, model_dir: str | Path, backend: str, *, device=None, dtype=None,
                 max_batch_size: int | None = None, max_input_length: int | None = None,
                 max_kv_cache_capacity: int | None = None, **triton_only):
        """model_dir: a directory `edgellm export` wrote. The limits default to the export's (its
        edgellm_engine.json) and may not exceed them; dtype defaults to the export's and must match it."""
        for name, off in _UNSUPPORTED_ARGS:
            if triton_only.pop(name, off) != off:
                raise ConfigurationError(f"{name} is not supported by the {backend} backend (exported graphs hold the "
                                         "base model only); use backend='triton'")
        if triton_only:
            raise TypeError(f"unexpected arguments {', '.join(triton_only)}")
        self.backend = backend
        self.model_dir = Path(model_dir)
        description = read_engine_json(self.model_dir)
        self.device = resolve_device(device)
        exported = _DTYPES[description["dtype"]]
        self.dtype = exported if dtype is None else resolve_dtype(dtype, self.device)
        if self.dtype != exported:
            raise BackendError(f"this export's graph is {description['dtype']}; the runner asks for {self.dtype} "
                               "(export again with that dtype)")
        limits = description["limits"]
        asked = dict(max_batch_size=max_batch_size, max_input_length=max_input_length,
                     max_kv_cache_capacity=max_kv_cache_capacity)
        for name, value in asked.items():
            if value is not None and value > limits[name]:
                raise BackendError(f"{name}={value} exceeds the {limits[name]} this export's engine is built for "
                                   f"(export again with a larger --{name.replace('_', '-')})")
        self.config = EngineConfig.from_model_dir(
            self.model_dir, **{k: limits[k] if v is None else v for k, v in asked.items()})
        mismatch = engine_matches_config(description, self.config)
        if mismatch:
            raise ModelLoadError(f"{self.model_dir}: the graph and config.json disagree ({'; '.join(mismatch)})")
        cfg = self.config
        self.embedding = load_file(str(self.model_dir / description["embedding"]))["embed"].to(self.device, self.dtype)
        self.kv_cache = LinearKVCache(
            num_layers=cfg.num_decoder_layers, max_batch_size=cfg.max_supported_batch_size,
            num_kv_heads=cfg.num_kv_heads, capacity=cfg.max_kv_cache_capacity, head_dim=cfg.head_dim,
            dtype=self.dtype, device=self.device)
        self.engine = self._open_engine(description, dict(
            max_batch_size=cfg.max_supported_batch_size, max_input_length=cfg.max_supported_input_length,
            max_kv_cache_capacity=cfg.max_kv_cache_capacity))
        self.logits = torch.zeros(cfg.max_supported_batch_size, cfg.vocab_size, dtype=torch.float32, device=self.device)
        self.kv_positions = torch.arange(cfg.max_kv_cache_capacity, dtype=torch.int32, device=self.device)
        self._lengths = [0] * (cfg.max_supported_batch_size + 1)  # host mirror of kv_cache.lengths
        self._rows: dict | None = None  # the running decode batch (start_decode): per-row device tensors

    def _open_engine(self, description: dict, limits: dict):
        """The engine that runs the graph: run(inputs, outputs, decode) on torch tensors bound by pointer."""
        from .onnxruntime_engine import OnnxRuntimeEngine
        return OnnxRuntimeEngine(self.model_dir, description, self.device)

    def __getattr__(self, name: str):
        """A runner method the exported graph does not have (called only for names not found above)."""
        if name.startswith("__"):
            raise AttributeError(name)
        backend = self.__dict__.get("backend", "exported")
        raise ConfigurationError(f"{name} is a triton-backend feature; the {backend} backend runs prefill_step, "
                                 "prefill_tokens, decode_step and the decode loop (start_decode .. end_decode)")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(input_ids.to(self.device), self.embedding)

    def full_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids  # (the full vocabulary)

    def _bindings(self, embeds, ints: torch.Tensor, keys: int):
        """The step's inputs and outputs by graph name: the runner's own tensors, nothing copied.
        ints: [3, rows] int32, the rows' past lengths, context lengths and slots."""
        rows = embeds.shape[0]
        inputs = dict(inputs_embeds=embeds, past_lengths=ints[0], context_lengths=ints[1], slots=ints[2],
                      kv_positions=self.kv_positions[:keys])
        outputs = dict(logits=self.logits[:rows])
        for layer in range(self.config.num_decoder_layers):
            inputs[f"past_key_values.{layer}"] = outputs[f"present_key_values.{layer}"] = self.kv_cache.data[layer]
        return inputs, outputs

    def _int32(self, *rows: list[int]) -> torch.Tensor:
        """Lists of ints as one int32 tensor on the device (one host-to-device copy), [len(rows), n]."""
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    def _slot_list(self, slots, batch: int) -> list[int]:
        return check_slots(slots, batch, self.config.max_supported_batch_size, "cpu").tolist()

    @staticmethod
    def _base_model_only(lora, rows: int) -> None:
        names = [lora] * rows if lora is None or isinstance(lora, str) else list(lora)
        if len(names) != rows or any(n not in (None, "") for n in names):
            raise LoraError("exported engines hold the base model only: lora must be None or '' for every row")

    def prefill_step(self, inputs_embeds: torch.Tensor, context_lengths, slots=None, lora=None,
                     cached_lengths=None, positions=None, position_offsets=None, *,
                     long_rope: bool = False) -> torch.Tensor:
        """As PrefillSteps.prefill_step (one graph call; no multimodal positions or LongRoPE).
        Returns a view of the runner's logits buffer, [B, vocab] float32, valid until the next step."""
        batch, seq, hidden = inputs_embeds.shape
        if hidden != self.config.hidden_size:
            raise InvalidRequestError(f"inputs_embeds must be [B, S, {self.config.hidden_size}]")
        if positions is not None or position_offsets is not None or long_rope:
            raise InvalidRequestError("positions / position_offsets / long_rope are not supported by exported engines")
        lengths = _int_list(context_lengths)
        cached, _ = prefill_rows(self.config, batch, seq, lengths, cached_lengths,
                                 self.config.max_supported_input_length)
        self._base_model_only(lora, batch)
        slot_ids = self._slot_list(slots, batch)
        embeds = inputs_embeds.to(self.device, self.dtype).contiguous()
        ints = self._int32(cached, lengths, slot_ids)
        self.engine.run(*self._bindings(embeds, ints, max(lengths)))
        self._set_lengths(slot_ids, lengths, ints)
        return self.logits[:batch]

    def prefill_tokens(self, prompts: list[list[int]], slots=None, lora=None, cached_lengths=None, **_):
        """prefill_step for prompts given as token ids (whole prompts; with cached_lengths, the tokens
        after each row's cached prefix)."""
        cached = [0] * len(prompts) if cached_lengths is None else _int_list(cached_lengths)
        if len(cached) != len(prompts) or not prompts:
            raise InvalidRequestError("prefill_tokens needs one or more prompts and one cached length each")
        new = [list(p[c:]) for p, c in zip(prompts, cached)]
        width = max(map(len, new))
        if min(map(len, new)) < 1 or any(t < 0 or t >= self.embedding.shape[0] for row in new for t in row):
            raise InvalidRequestError(f"each prompt needs a token past its cached prefix, ids in "
                                      f"[0, {self.embedding.shape[0]})")
        ids = torch.tensor([row + [0] * (width - len(row)) for row in new])
        return self.prefill_step(self.embed(ids), [len(p) for p in prompts], slots, lora, cached)

    def decode_step(self, inputs_embeds: torch.Tensor, slots=None, lora=None) -> torch.Tensor:
        """As DecodeSteps.decode_step: one token a row ([b, 1, hidden] or [b, hidden]); returns a
        view of the runner's logits buffer, [b, vocab] float32, valid until the next step."""
        if inputs_embeds.dim() == 2:
            inputs_embeds = inputs_embeds[:, None]
        batch = inputs_embeds.shape[0]
        if inputs_embeds.shape[1:] != (1, self.config.hidden_size):
            raise InvalidRequestError(f"inputs_embeds must be [b, 1, {self.config.hidden_size}]")
        if batch > self.config.max_supported_batch_size:
            raise InvalidRequestError(f"batch of {batch} exceeds max_batch_size {self.config.max_supported_batch_size}")
        self._base_model_only(lora, batch)
        slot_ids = self._slot_list(slots, batch)
        past = [self._lengths[s] for s in slot_ids]
        if min(past) < 1 or max(past) >= self.config.max_kv_cache_capacity:
            raise InvalidRequestError(f"decode needs prefilled slots with room left (lengths {past}, capacity "
                                      f"{self.config.max_kv_cache_capacity})")
        context = [n + 1 for n in past]
        embeds = inputs_embeds.to(self.device, self.dtype).contiguous()
        ints = self._run_decode(embeds, past, context, slot_ids)
        self._set_lengths(slot_ids, context, ints)
        return self.logits[:batch]

    def _run_decode(self, embeds, past: list[int], context: list[int], slot_ids: list[int]) -> torch.Tensor:
        """One decode call of the engine; returns the step's int32 [3, b] (past, context lengths, slots)."""
        ints = self._int32(past, context, slot_ids)
        self.engine.run(*self._bindings(embeds, ints, max(context)), decode=True)
        return ints

    def _set_lengths(self, slot_ids: list[int], lengths: list[int], ints: torch.Tensor) -> None:
        """The rows' new lengths in the host mirror and in the cache's device lengths (from the step's
        own int32 tensor: row 1 lengths, row 2 slots; no further copy to the device)."""
        for slot, n in zip(slot_ids, lengths):
            self._lengths[slot] = n
        self.kv_cache.lengths[ints[2].long()] = ints[1]

    def sample(self, logits: torch.Tensor, temperature, top_k, top_p, seeds, offsets, group: int = 1) -> torch.Tensor:
        """Tokens drawn from `logits` as the triton backend draws them (kernels/sampling.py)."""
        return ops.sample(logits, temperature, top_k, top_p, seeds, offsets, group=group)

    def start_decode(self, tokens, slots, temperature, top_k, top_p, seeds, offsets, lora=None) -> None:
        """As DecodeSteps.start_decode (base model only)."""
        rows = decode_rows(self.device, self.config.max_supported_batch_size, tokens, slots, temperature, top_k,
                           top_p, seeds, offsets)
        self._base_model_only(lora, rows["slots"].shape[0])
        self._rows = rows

    def _running(self, caller: str) -> dict:
        if self._rows is None:
            raise RuntimeError(f"{caller} before start_decode")
        return self._rows

    def decode_sample_step(self) -> torch.Tensor:
        """One eager decode step of the running rows: their sampled tokens, [n] int64 on the device."""
        rows = self._running("decode_sample_step")
        logits = self.decode_step(self.embed(rows["tokens"][:, None]), rows["slots"])
        rows["offsets"] += 1
        rows["tokens"] = self.sample(logits, rows["temperature"], rows["top_k"], rows["top_p"], rows["seeds"],
                                     rows["offsets"])
        return rows["tokens"]

    def decode_launch(self) -> PendingTokens:
        """decode_sample_step, its tokens already on the host (the step is eager)."""
        return PendingTokens(self.decode_sample_step().cpu(), None)

    def add_decode_rows(self, tokens, slots, temperature, top_k, top_p, seeds, offsets, lora=None) -> None:
        """As DecodeSteps.add_decode_rows (base model only)."""
        if self._rows is None:
            return self.start_decode(tokens, slots, temperature, top_k, top_p, seeds, offsets, lora)
        most = self.config.max_supported_batch_size
        new = decode_rows(self.device, most, tokens, slots, temperature, top_k, top_p, seeds, offsets)
        self._base_model_only(lora, new["slots"].shape[0])
        self._rows = joined_rows(self._rows, new, most)

    def keep_decode_rows(self, keep) -> None:
        index = torch.as_tensor(list(keep), dtype=torch.int64, device=self.device)
        self._rows = {name: values[index] for name, values in self._running("keep_decode_rows").items()}

    def end_decode(self) -> None:
        self._rows = None

    def holds_adapter(self, slot: int) -> bool:
        return False  # (no adapters)
