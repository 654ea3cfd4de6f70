"""LLMEngineRunner: owns one model's weights, KV cache and RoPE cache; runs prefill and decode steps.

Mirrors the seeds' engine runner: the runtime hands it input embeddings and gets logits back;
it knows nothing of text or requests. Rows of a batch live in KV-cache *slots*; a decode step runs
any subset of slots, so rows that finish can leave the batch without moving anyone's cache.

Prefill (prefill_step, and prefill_tokens for token ids) lives in prefill_steps.py. The fast decode
path is `start_decode(...)` then `decode_sample_step()` per token: embedding, all layers, LM head and
sampling run from static buffers with no host synchronisation, replayed from a CUDA graph per padded
batch size (decode_steps.py, graphs.py); `decode_step` is the seeds' eager embeddings-in, logits-out step.

Inference mode: the public methods run in torch's inference mode whatever the caller's mode (the
buffers they make on first use are then inference tensors, which only inference mode may update),
and give a caller outside it ordinary tensors (copies) back. State made at construction (weights,
KV cache, RoPE table, LoRA stacks) is made outside inference mode, so callers may touch it either way.
A runner is driven by one thread at a time; LLMInferenceRuntime serializes its callers.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..kernels import ops, rope_inv_freq
from ..kernels.lora import UNROLL, used_slots
from ..kernels.tree_mask import MAX_TREE
from ..errors import ConfigurationError, InvalidRequestError, LoraError
from ..quant.formats import QUANT_KINDS, QuantizedWeight
from .config import EngineConfig
from .backends import check_backend
from .devices import resolve_device, resolve_dtype
from .graphs import DecodeBuffers, PrefillBuffers, PrefillStorage, StepGraphs, TreeBuffers, any_adapter
from .kv_cache import LinearKVCache
from .lora import DEFAULT_MAX_LORAS, LoraStacks, read_adapter
from .memory import check_fits, engine_memory_plan, free_bytes
from .modes import inference_call, outside_inference_mode
from .decode_steps import DecodeSteps
from .longrope import LongRopeSteps
from .persistent import plan_for
from .prefill_steps import PrefillSteps
from .verify import TreeSteps
from .model import LoraBatch, RopeTables, forward_logits
from .vocab_map import load_vocab_map
from .weights import load_weights

# Prompts longer than this are prefilled chunk by chunk. 2048 measured fastest on the H100 for 1024- to
# 8192-token prompts of the Llama-3.2-1B shape against 1024 and 4096 (bench/prefill_chunks.py, issue 19).
DEFAULT_PREFILL_CHUNK = 2048

class LLMEngineRunner(PrefillSteps, DecodeSteps, TreeSteps, LongRopeSteps):
    def __new__(cls, *args, backend: str = "triton", **kwargs):
        """backend "triton" (the default): this class, the engine's own forward. "onnxruntime" or
        "tensorrt": an ExportedEngineRunner (engine/backends/runner.py) over the directory `edgellm
        export` wrote, with the same prefill_step / decode_step interface."""
        if check_backend(backend) != "triton" and cls is LLMEngineRunner:
            from .backends.runner import ExportedEngineRunner
            cls = ExportedEngineRunner
        return super().__new__(cls)

    @outside_inference_mode
    def __init__(self, model_dir: str | Path, *, backend: str = "triton", device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, max_batch_size: int | None = None,
                 max_input_length: int | None = None, max_kv_cache_capacity: int | None = None,
                 cuda_graphs: bool = True, prefill_chunk_size: int | None = None,
                 lora_weights: dict | None = None, max_lora_rank: int | None = None, max_loras: int | None = None,
                 max_verify_tokens: int = 0, extra_device_bytes: dict[str, int] | None = None,
                 vocab_map: str | Path | None = None, quantization: str | None = None,
                 quantize_lm_head: bool = False):
        """backend: "triton" here (see __new__ for the others).
        cuda_graphs: replay decode steps from CUDA graphs (on CUDA; eager elsewhere or when False).
        prefill_chunk_size: prompts longer than this are prefilled in chunks of it (default 2048).
        lora_weights: {name: adapter} loaded at start; an adapter is a PEFT directory, a bare
        .safetensors path, or {"path": ..., "alpha": ..., "rank": ...} (see add_lora_weights).
        max_lora_rank: the largest adapter rank this engine accepts (default: the largest given
        adapter's, 0 = no LoRA). max_loras: adapters loaded at once (default 8). max_verify_tokens: the
        largest token tree (root included) verify_sample_step takes, up to 64 (0: no speculative
        verification, no verify graphs; engine/verify.py). extra_device_bytes:
        {what: bytes} the caller will allocate on the device beside the engine (counted below).
        vocab_map: a directory holding vocab_map.safetensors (or the file): the LM head keeps only those
        rows, so every step's logits cover the reduced vocabulary ([B, reduced]; `self.vocab_map` maps
        a logits column to its full id) and sampled tokens are turned back into full ids on the device
        (kernels/vocab_remap.py, inside the decode graphs). The input embedding stays full.
        quantization: None, "int8" (per output channel), "int4" (groups of 128, asymmetric) or "fp8"
        (E4M3, per output channel): the layers' linear weights are quantized at load (round to nearest,
        edgellm/quant) and decode reads them packed (kernels/gemv.py). The embedding stays in the
        compute dtype; quantize_lm_head packs the LM head too.

        Before anything is allocated, the bytes these limits need (engine/memory.py) are checked
        against the device's free memory (host memory on the CPU): ConfigurationError if they do not fit."""
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.config = EngineConfig.from_model_dir(
            self.model_dir, max_batch_size=max_batch_size, max_input_length=max_input_length,
            max_kv_cache_capacity=max_kv_cache_capacity)
        adapters = {name: self._read_adapter(name, spec) for name, spec in (lora_weights or {}).items()}
        max_lora_rank = self._lora_limits(adapters, max_lora_rank, max_loras)
        if quantization is not None and quantization not in QUANT_KINDS:
            raise ConfigurationError(f"unsupported quantization {quantization!r}; supported: {', '.join(QUANT_KINDS)}")
        stored = self.config.quant_method  # a checkpoint already quantized (AWQ / GPTQ / edgellm): as stored
        if stored and quantization not in (None, self.config.quantization):
            raise ConfigurationError(f"this checkpoint is already {stored} {self.config.quantization}; it cannot be "
                                     f"loaded as {quantization}")
        if quantize_lm_head and quantization is None:
            raise ConfigurationError("quantize_lm_head needs a quantization (int8, int4 or fp8)")
        self.config = dataclasses.replace(self.config, max_supported_lora_rank=max_lora_rank,
                                          quantization=quantization or self.config.quantization,
                                          quantize_lm_head=bool(quantize_lm_head))
        reduced = None
        if vocab_map is not None:  # checked before any memory is planned or allocated
            reduced = load_vocab_map(vocab_map, self.config.vocab_size, required=self.config.eos_token_ids)
            self.config = dataclasses.replace(self.config, reduced_vocab_size=reduced.numel())
        cfg = self.config
        chunk = DEFAULT_PREFILL_CHUNK if prefill_chunk_size is None else prefill_chunk_size
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ConfigurationError(f"prefill_chunk_size must be a positive integer, got {prefill_chunk_size!r}")
        self.prefill_chunk_size = chunk
        if not isinstance(max_verify_tokens, int) or isinstance(max_verify_tokens, bool) \
                or not 0 <= max_verify_tokens <= MAX_TREE:
            raise ConfigurationError(f"max_verify_tokens must be an integer in [0, {MAX_TREE}], got {max_verify_tokens!r}")
        shortest = min((w for w in cfg.layer_windows if w), default=0)
        if max_verify_tokens and shortest and max_verify_tokens >= shortest:
            raise ConfigurationError(f"max_verify_tokens ({max_verify_tokens}) must be below the model's sliding "
                                     f"window ({shortest}): a token tree must fit in every layer's window")
        self.max_verify_tokens = max_verify_tokens
        self.graphs = StepGraphs(self.device, enabled=cuda_graphs)
        self.memory_plan = engine_memory_plan(
            cfg, self.dtype, prefill_chunk=chunk, graphs=self.graphs.enabled, cuda=self.device.type == "cuda",
            max_lora_rank=max_lora_rank, max_loras=(max_loras or DEFAULT_MAX_LORAS) if max_lora_rank else 0,
            max_verify_tokens=max_verify_tokens, extra=extra_device_bytes)
        check_fits(self.memory_plan, self.device, free_bytes(self.device))
        self.weights = load_weights(self.model_dir, cfg, dtype=self.dtype, device=self.device)
        self.vocab_map: torch.Tensor | None = None  # int32 [reduced]: logits column -> full token id
        if reduced is not None:
            self.vocab_map = reduced.to(self.device)
            head = self.weights.lm_head
            self.weights.lm_head = head.rows(self.vocab_map) if isinstance(head, QuantizedWeight) else \
                head.index_select(0, self.vocab_map).contiguous()
        self.kv_cache = LinearKVCache(
            num_layers=cfg.num_decoder_layers, max_batch_size=cfg.max_supported_batch_size,
            num_kv_heads=cfg.num_kv_heads, capacity=cfg.max_kv_cache_capacity, head_dim=cfg.head_dim,
            dtype=self.dtype, device=self.device)
        # LongRoPE: the original context length (see _longrope_tables); None for other RoPE kinds.
        self.longrope_original = int(cfg.rope_scaling["original_max_position_embeddings"]) \
            if (cfg.rope_scaling or {}).get("rope_type") == "longrope" else None
        if self.longrope_original is not None:
            self.rope_cos_sin = self._longrope_tables()
        else:
            inv_freq = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling).to(self.device)
            self.rope_cos_sin = ops.rope_cos_sin_cache(inv_freq, cfg.max_kv_cache_capacity)
        # Per-slot position offsets, read by the step kernels on the device (so graphs see them):
        # multimodal RoPE's decode positions run `offset` behind the cache positions; LongRoPE rows
        # whose prompt outgrew the original context read the second half of the table.
        offsets = torch.zeros(cfg.max_supported_batch_size + 1, dtype=torch.int32, device=self.device) \
            if cfg.mrope_section or self.longrope_original is not None else None
        local = None  # the sliding-window layers' own RoPE base (Gemma 3)
        if cfg.rope_local_theta is not None:
            local = ops.rope_cos_sin_cache(rope_inv_freq(cfg.rotary_dim, cfg.rope_local_theta, None).to(self.device),
                                           cfg.max_kv_cache_capacity)
        self.rope = RopeTables(*self.rope_cos_sin, offsets, cfg.mrope_section, local)
        # Batch-1 decode steps through the persistent kernel where it runs this model (engine/persistent.py).
        self.persistent = plan_for(cfg, self.weights, self.kv_cache.data, self.rope, self.longrope_original is not None)
        self._decode_buffers: dict[int, DecodeBuffers] = {}
        self._prefill_buffers: dict[tuple[int, int], PrefillBuffers] = {}
        self._prefill_storage: PrefillStorage | None = None
        # The KV store's pools of saved blocks (attach_block_pools), and the stream that copies host blocks
        self.block_pool: torch.Tensor | None = None
        self.host_block_pool: torch.Tensor | None = None
        self._host_copy_stream = None
        self._trees: dict[tuple[int, int], TreeBuffers] = {}  # verify steps' buffers, by (size, tree nodes)
        self._active: DecodeBuffers | None = None
        self._host_tokens: list[torch.Tensor] | None = None  # decode_launch's pinned pair, used in turn
        self._host_turn = 0
        self.lora = LoraStacks(cfg, max_lora_rank, max_loras or DEFAULT_MAX_LORAS, self.dtype, self.device) \
            if max_lora_rank else None
        self._active_lora = ""  # the adapter rows use when a call names none ("" = the base model)
        for name, adapter in adapters.items():
            self.lora.add(name, adapter)

    def prefix_fingerprint(self, adapter: str, prompt_length: int) -> str:
        """What, besides the tokens, a saved prefix's KV depends on: the adapter, and for LongRoPE
        whether the prompt outgrew the original context (its keys were rotated with the long factors)."""
        long = self.longrope_original is not None and prompt_length > self.longrope_original
        return self.lora_fingerprint(adapter) + ("|longrope" if long else "")

    def full_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids sampled from (or picked out of) this engine's logits, as full-vocabulary ids
        (int64): the identity without a reduced vocabulary."""
        return ids if self.vocab_map is None else ops.vocab_remap(ids, self.vocab_map)

    # Accessors named after the seeds' API.
    def get_engine_config(self) -> EngineConfig:
        return self.config

    def get_linear_kv_cache(self) -> LinearKVCache:
        return self.kv_cache

    def get_rope_cos_sin_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope_cos_sin

    # ---- LoRA adapters (engine/lora.py): any mix of them, or none, in one batch ----

    def _read_adapter(self, name, spec):
        if self.config.mlp != "gated":
            raise LoraError("LoRA adapters are supported for models with a gated MLP (llama, mistral, qwen2, qwen3, "
                            f"phi3, gemma3_text); this model is {self.config.model_type}")
        if not isinstance(name, str) or not name:
            raise LoraError(f"a LoRA adapter name must be a non-empty string, got {name!r}")
        if isinstance(spec, dict):
            unknown = set(spec) - {"path", "rank", "alpha"}
            if "path" not in spec or unknown:
                raise LoraError(f"LoRA adapter {name!r}: give a path, or a dict with 'path' and optional "
                                "'rank' / 'alpha'")
            return read_adapter(spec["path"], self.config, rank=spec.get("rank"), alpha=spec.get("alpha"))
        if not isinstance(spec, (str, Path)):
            raise LoraError(f"LoRA adapter {name!r}: expected a path, got {type(spec).__name__}")
        return read_adapter(spec, self.config)

    @staticmethod
    def _lora_limits(adapters: dict, max_lora_rank, max_loras) -> int:
        for value, what in ((max_lora_rank, "max_lora_rank"), (max_loras, "max_loras")):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigurationError(f"{what} must be a non-negative integer, got {value!r}")
        if max_loras is not None and max_loras < max(1, len(adapters)):
            raise ConfigurationError(f"max_loras={max_loras} cannot hold the {len(adapters)} adapters given")
        rank = max((a.rank for a in adapters.values()), default=0) if max_lora_rank is None else max_lora_rank
        too_big = [n for n, a in adapters.items() if a.rank > rank]
        if too_big:
            raise LoraError(f"LoRA adapter {too_big[0]!r} has rank {adapters[too_big[0]].rank}, above "
                            f"max_lora_rank {rank}")
        return rank

    def _lora_stacks(self) -> LoraStacks:
        if self.lora is None:
            raise LoraError("this engine was built without LoRA support: pass max_lora_rank=N (or lora_weights) "
                            "when building it")
        return self.lora

    @inference_call
    def add_lora_weights(self, name: str, path, *, rank: int | None = None, alpha: float | None = None) -> None:
        """Load an adapter under `name`: a PEFT directory, or a bare .safetensors file with its `alpha`
        (rank from the tensors; a given `rank` must agree). Checked in full before anything is written."""
        stacks = self._lora_stacks()
        if isinstance(name, str) and name in stacks.slots:
            raise LoraError(f"a LoRA adapter named {name!r} is already loaded; remove it first")
        adapter = self._read_adapter(name, {"path": path, "rank": rank, "alpha": alpha})
        stacks.add(name, adapter)

    @inference_call
    def remove_lora_weights(self, name: str) -> None:
        slot = self.lora_slot(name)
        if slot < 0:
            raise LoraError("remove_lora_weights needs an adapter name ('' is the base model)")
        if self._active is not None and slot in self._active.lora_host[:self._active.live]:
            raise LoraError(f"LoRA adapter {name!r} is in use by the running decode batch (end_decode() first)")
        self.lora.remove(name)
        if self._active_lora == name:
            self._active_lora = ""

    @inference_call
    def switch_lora_weights(self, name: str) -> bool:
        """Make `name` the adapter used when a call names none ("" = the base model). The KV cache and
        the model weights are untouched."""
        self.lora_slot(name)  # raises for an unknown name
        self._active_lora = name
        return True

    def get_available_lora_weights(self) -> list[str]:
        return sorted(self.lora.slots) if self.lora is not None else []

    def get_active_lora_weights_name(self) -> str:
        return self._active_lora

    def lora_slot(self, name: str | None) -> int:
        """The stack slot of adapter `name` (None: the active adapter; "": -1, the base model)."""
        name = self._active_lora if name is None else name
        if not isinstance(name, str):
            raise LoraError(f"a LoRA adapter name must be a string, got {name!r}")
        if name == "":
            return -1
        if self.lora is None or name not in self.lora.slots:
            available = ", ".join(self.get_available_lora_weights()) or "none loaded"
            raise LoraError(f"unknown LoRA adapter {name!r} (available: {available}; '' is the base model)")
        return self.lora.slots[name]

    def lora_fingerprint(self, name: str | None) -> str:
        """What names adapter `name`'s weights ("" for the base model): its name and a digest of its
        content, so a saved KV prefix is never reused under another adapter of the same name."""
        slot = self.lora_slot(name)
        if slot < 0:
            return ""
        name = self._active_lora if name is None else name
        return f"{name}:{self.lora.fingerprints[name]}"

    def _lora_rows(self, lora, batch: int) -> list[int]:
        """Per-row adapter slots from `lora`: None (the active adapter for every row) or one name per row."""
        if lora is None or isinstance(lora, str):
            return [self.lora_slot(lora)] * batch
        names = list(lora)
        if len(names) != batch:
            raise InvalidRequestError(f"lora: {len(names)} adapter names for {batch} rows")
        return [self.lora_slot(n) for n in names]

    def _lora_tensors(self, lora_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row slots and the used-slot list (kernels/lora.py) as device tensors."""
        return (torch.tensor(lora_rows, dtype=torch.int32, device=self.device),
                used_slots(lora_rows, self._lora_capacity(), self.device))

    def _lora_capacity(self) -> int:
        """Entries of a used-slot list (kernels/lora.py used_slots) for this engine."""
        return max(self.lora.max_loras if self.lora is not None else 0, UNROLL)

    def _lora_batch(self, index: torch.Tensor, used: torch.Tensor, uses_lora: bool) -> LoraBatch | None:
        return LoraBatch(self.lora, index, used) if uses_lora else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [...] -> input embeddings [..., hidden] in the engine dtype."""
        return torch.nn.functional.embedding(input_ids.to(self.device), self.weights.embed)

    def _slots(self, slots, batch: int, on_device: bool = True) -> torch.Tensor:
        """The rows' cache slots (default 0..batch-1), int32, checked when they come from the host;
        on the device, or (on_device=False) on the host (device tensors are brought back: rare)."""
        if slots is None:
            return torch.arange(batch, dtype=torch.int32, device=self.device if on_device else "cpu")
        slots = torch.as_tensor(slots, dtype=torch.int32)
        if slots.device.type == "cpu":  # the host-side check is free here (device tensors are the caller's)
            if slots.shape != (batch,) or slots.unique().numel() != batch or slots.min() < 0 \
                    or slots.max() >= self.config.max_supported_batch_size:
                raise InvalidRequestError(f"slots must be {batch} distinct values in "
                                          f"[0, {self.config.max_supported_batch_size})")
        return slots.to(self.device if on_device else "cpu")

    @inference_call
    def decode_step(self, inputs_embeds: torch.Tensor, slots=None, lora=None) -> torch.Tensor:
        """Append one token per row: inputs_embeds [b, 1, hidden] for cache slots `slots`
        (default 0..b-1), adapters `lora` as in prefill_step. Returns the new logits, [b, vocab] float32."""
        if inputs_embeds.dim() == 2:
            inputs_embeds = inputs_embeds[:, None]
        batch = inputs_embeds.shape[0]
        slot_ids = self._slots(slots, batch)
        lora_rows = self._lora_rows(lora, batch)
        lora_batch = self._lora_batch(*self._lora_tensors(lora_rows), any_adapter(lora_rows))
        starts = self.kv_cache.lengths[slot_ids.long()]
        q_lens = torch.ones(batch, dtype=torch.int32, device=self.device)
        logits = forward_logits(self.weights, self.config, self.kv_cache, self.rope,
                                inputs_embeds.to(self.dtype), slot_ids, starts, q_lens, lora=lora_batch)
        self.kv_cache.lengths[slot_ids.long()] = starts + 1
        return logits
