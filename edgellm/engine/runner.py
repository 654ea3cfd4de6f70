"""LLMEngineRunner: one model's engine, as in the seeds' engine runner: input embeddings (or token ids)
in, logits or sampled tokens out, rows in KV-cache *slots*; it knows nothing of text or requests.

The path of a step through the code, in the order a request meets it:
  runner.py          builds the engine (checks the limits against free memory: memory.py), then each
                     public method hands its work to one step object below (the `_run_by` table);
  state.py           EngineState: config, weights (weights.py), KV cache (kv_cache.py), RoPE tables
                     (longrope.py for LongRoPE), the settings (switches.py) and forward()/sample();
  adapters.py        the LoRA adapters (stacks: lora.py), each row's adapter slot;
  prefill_steps.py   prefill_step / prefill_tokens: a prompt into its slot, chunk by chunk, replayed
                     from CUDA graphs (graphs.py) over static buffers;
  decode_steps.py    start_decode, then decode_sample_step / decode_launch per token: embedding, all
                     layers, LM head and sampling in one graph per padded batch size (or in two
                     halves, forward and draw, where token masks are set between); rows join
                     (add_decode_rows) and leave (keep_decode_rows) between steps; decode_step is the
                     seeds' eager step;
  mixed_steps.py     mixed_launch: a decode step and a chunk of waiting prompts in one forward (the
                     continuous-batching loop's prefill while rows decode);
  verify.py          speculative token trees through the model in one step (verify_sample_trees);
  model.py           forward_logits: the one decoder forward every step runs, each op from kernels/.
With backend="onnxruntime", prefill_step / prefill_tokens / decode_step run the graph
`edgellm export` wrote (backends/exported_steps.py) instead, and the Triton-only methods refuse.

Inference mode: the public methods run in torch's inference mode whatever the caller's mode (the
buffers they make on first use are then inference tensors, which only inference mode may update),
and give a caller outside it ordinary tensors (copies) back. State made at construction (weights,
KV cache, RoPE table, LoRA stacks) is made outside inference mode, so callers may touch it either way.
A runner is driven by one thread at a time; LLMInferenceRuntime serializes its callers.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

from ..errors import ConfigurationError, LoraError, ModelLoadError
from ..kernels import ops, rope_inv_freq
from ..kernels.tree_mask import MAX_TREE
from ..quant.formats import QUANT_KINDS, QuantizedWeight
from .adapters import Adapters, lora_limits, read_adapter_spec
from .backends import check_backend
from .backends.export_format import is_export
from .config import EngineConfig
from .decode_steps import DecodeSteps
from .devices import resolve_device, resolve_dtype, to_device
from .graphs import StepGraphs
from .kv_cache import LinearKVCache
from .logit_processing import LOGPROB_WIDTH, LogitProcessing, LogitSettings
from .longrope import NO_DRAFT_LIMIT, LongRope, longrope_original, longrope_tables
from .lora import DEFAULT_MAX_LORAS, LoraStacks
from .memory import check_fits, engine_memory_plan, free_bytes
from .mixed_steps import MixedSteps
from .model import RopeTables
from .modes import inference_call, outside_inference_mode
from .prefill_steps import PrefillSteps
from .state import EngineState
from .switches import Switches
from .verify import TreeSteps
from .vocab_map import load_vocab_map
from .weights import load_weights

# Prompts longer than this are prefilled chunk by chunk. 2048 measured fastest on the H100 for 1024- to
# 8192-token prompts of the Llama-3.2-1B shape against 1024 and 4096 (bench/prefill_chunks.py).
DEFAULT_PREFILL_CHUNK = 2048


def _run_by(part: str, method):
    """A public method of the runner that its step object `part` runs (the attribute holding it): the
    name, signature and docstring of `method`, that step class's, called in inference mode (modes.py).
    Over an exported graph `part` is its ExportedSteps, which runs the method or refuses it by name."""
    name = method.__name__

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return getattr(getattr(self, part), name)(*args, **kwargs)
    return inference_call(call)


class LLMEngineRunner:
    @outside_inference_mode
    def __init__(self, model_dir: str | Path, *, backend: str = "triton", device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, max_batch_size: int | None = None,
                 max_input_length: int | None = None, max_kv_cache_capacity: int | None = None,
                 cuda_graphs: bool = True, prefill_chunk_size: int | None = None,
                 lora_weights: dict | None = None, max_lora_rank: int | None = None, max_loras: int | None = None,
                 max_verify_tokens: int = 0, extra_device_bytes: dict[str, int] | None = None,
                 vocab_map: str | Path | None = None, quantization: str | None = None,
                 quantize_lm_head: bool = False, switches: Switches | None = None):
        """backend: "triton" (the default), the engine's own forward; "onnxruntime": the
        directory `edgellm export` wrote, run by onnxruntime (backends/exported_steps.py: the same
        prefill_step / prefill_tokens / decode_step; the other arguments below are Triton-only).
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
        compute dtype; quantize_lm_head packs the LM head too. switches: the A/B settings
        (engine/switches.py; default: read from the environment, once, here).

        Before anything is allocated, the bytes these limits need (engine/memory.py) are checked
        against the device's free memory (host memory on the CPU): ConfigurationError if they do not fit."""
        self.backend = check_backend(backend)
        self.model_dir = Path(model_dir)
        self.switches = Switches.from_environment() if switches is None else switches
        if self.backend != "triton":
            from .backends.exported_steps import ExportedSteps
            steps = ExportedSteps(self.model_dir, backend, device=device, dtype=dtype, max_batch_size=max_batch_size,
                                  max_input_length=max_input_length, max_kv_cache_capacity=max_kv_cache_capacity,
                                  lora_weights=lora_weights, max_lora_rank=max_lora_rank,
                                  max_loras=max_loras, max_verify_tokens=max_verify_tokens, vocab_map=vocab_map,
                                  quantization=quantization, quantize_lm_head=quantize_lm_head)
            self._use_exported(steps)
            return
        if is_export(self.model_dir):
            raise ModelLoadError(f"{self.model_dir} is an `edgellm export` (an ONNX graph, no checkpoint): open it "
                                 "with backend='onnxruntime'")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.config = EngineConfig.from_model_dir(
            self.model_dir, max_batch_size=max_batch_size, max_input_length=max_input_length,
            max_kv_cache_capacity=max_kv_cache_capacity)
        adapters = {name: read_adapter_spec(self.config, name, spec) for name, spec in (lora_weights or {}).items()}
        max_lora_rank = lora_limits(adapters, max_lora_rank, max_loras)
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
        max_loras = max_loras or DEFAULT_MAX_LORAS
        self.memory_plan = engine_memory_plan(
            cfg, self.dtype, prefill_chunk=chunk, graphs=self.graphs.enabled, cuda=self.device.type == "cuda",
            max_lora_rank=max_lora_rank, max_loras=max_loras if max_lora_rank else 0,
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
        original = longrope_original(cfg)
        self.longrope = LongRope(original) if original is not None else None
        self.rope = self._rope_tables(cfg, original)
        self.rope_cos_sin = (self.rope.cos, self.rope.sin)
        self.state = EngineState(cfg, self.device, self.dtype, self.weights, self.kv_cache, self.rope, self.switches,
                                 self.vocab_map, original)
        self.lora = LoraStacks(cfg, max_lora_rank, max_loras, self.dtype, self.device) if max_lora_rank else None
        self.adapters = Adapters(cfg, self.lora, self.device)
        for name, adapter in adapters.items():
            self.lora.add(name, adapter)
        self._prefill = PrefillSteps(self.state, self.adapters, self.graphs, chunk)
        self._verify = TreeSteps(self.state, self.adapters, self.graphs, max_verify_tokens)
        self._decode = DecodeSteps(self.state, self.adapters, self.graphs, self._verify)
        self._mixed = MixedSteps(self.state, self.adapters, self.graphs, self._decode, chunk)

    def _rope_tables(self, cfg: EngineConfig, original: int | None) -> RopeTables:
        """cos / sin (LongRoPE's two-half table where `original` is its original context), per-slot
        offsets where the kernels read them, Gemma 3's local-layer table."""
        if original is not None:
            cos, sin = longrope_tables(cfg, original, self.device)
        else:
            cos, sin = ops.rope_cos_sin_cache(rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)
                                              .to(self.device), cfg.max_kv_cache_capacity)
        # Per-slot position offsets, read by the step kernels on the device (so graphs see them):
        # multimodal RoPE's decode positions run `offset` behind the cache positions; LongRoPE rows
        # whose prompt outgrew the original context read the second half of the table.
        offsets = torch.zeros(cfg.max_supported_batch_size + 1, dtype=torch.int32, device=self.device) \
            if cfg.mrope_section or original is not None else None
        local = None  # the sliding-window layers' own RoPE base (Gemma 3)
        if cfg.rope_local_theta is not None:
            local = ops.rope_cos_sin_cache(rope_inv_freq(cfg.rotary_dim, cfg.rope_local_theta, None).to(self.device),
                                           cfg.max_kv_cache_capacity)
        return RopeTables(cos, sin, offsets, cfg.mrope_section, local)

    def _use_exported(self, steps) -> None:
        """The runner over an exported graph: its steps serve prefill and decode; what they lack refuses."""
        self.config, self.device, self.dtype, self.kv_cache = steps.config, steps.device, steps.dtype, steps.kv_cache
        self.engine, self.logits = steps.engine, steps.logits
        self.vocab_map, self.longrope, self.lora, self.max_verify_tokens = None, None, None, 0
        self.prefill_chunk_size = self.config.max_supported_input_length  # one graph call per prefill
        self.adapters = Adapters(self.config, None, self.device)
        self.state = self._prefill = self._decode = self._mixed = steps
        self._verify = steps  # (no verify steps: its attributes refuse, naming the runner's method)

    # Accessors named after the seeds' API.
    def get_engine_config(self) -> EngineConfig:
        return self.config

    def get_linear_kv_cache(self) -> LinearKVCache:
        return self.kv_cache

    def get_rope_cos_sin_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend != "triton":
            raise ConfigurationError(f"the {self.backend} backend computes RoPE inside its graph (no table)")
        return self.rope_cos_sin

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [...] -> input embeddings [..., hidden] in the engine dtype."""
        return self.state.embed(input_ids)

    def full_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids sampled from (or picked out of) this engine's logits, as full-vocabulary ids
        (int64): the identity without a reduced vocabulary."""
        return self.state.full_ids(ids)

    @inference_call
    def sample(self, logits: torch.Tensor, temperature, top_k, top_p, seeds, offsets, slots=None,
               with_logprobs: bool = False):
        """Tokens drawn from `logits` ([n, vocab], e.g. a prefill's) with per-row settings (all [n] on the
        device; kernels/sampling.py: the draw is keyed by seed and RNG offset), as full-vocabulary ids.
        slots: the rows' KV slots, whose logit processing (set_logit_processing) applies first.
        with_logprobs: returns (tokens, each row's logprobs as decode steps write them: LOGPROB_WIDTH values)."""
        if self.backend != "triton":  # (the runtime refuses logit processing and logprobs there)
            return self.state.sample(logits, temperature, top_k, top_p, seeds, offsets)
        processed = slots is not None and self.state.processing_active
        out = torch.empty(logits.shape[0], LOGPROB_WIDTH, dtype=torch.float32, device=self.device) \
            if with_logprobs else None
        tokens = self.state.sample(logits, temperature, top_k, top_p, seeds, offsets,
                                   slots=to_device(slots, torch.int32, self.device) if processed else None,
                                   logprobs=out)
        return (tokens, out.tolist()) if with_logprobs else tokens

    # ---- logit processing per slot (engine/logit_processing.py) ----

    def set_logit_processing(self, slot: int, settings: LogitSettings, prompt: list[int], temperature: float) -> None:
        """From now on (queued behind the steps in flight) the rows in `slot` have their logits processed
        with `settings` before each draw (its first token's too), its output counts at zero and `prompt`'s
        tokens seen; `temperature`: the row's (min_p's threshold)."""
        self._processing().enable(slot, settings, prompt, temperature)

    def want_logprobs(self, slot: int, wanted: bool) -> None:
        """Whether the row in `slot` reports token logprobs: steps write them (sample's with_logprobs, and
        the PendingTokens of decode and mixed steps) while any slot wants them."""
        if wanted or self.state.processing is not None:
            self._processing().want_logprobs(slot, wanted)

    def _processing(self) -> LogitProcessing:
        if self.state.processing is None:
            width = self.vocab_map.shape[0] if self.vocab_map is not None else self.config.vocab_size
            self.state.processing = LogitProcessing(self.kv_cache.scratch_slot + 1, width, self.device, self.vocab_map,
                                                    self.config.vocab_size)
        return self.state.processing

    def set_token_masks(self, slots: list[int], words: torch.Tensor) -> None:
        """The next draws of the processed slots' rows (set_logit_processing first) only among the tokens
        whose bits `words` sets ([len(slots), token_mask_words] int32 on the host, bit j of word i: token
        32 i + j), row i for slots[i]; queued behind the steps in flight: the caller sets them before
        launching the draw they are for."""
        self._processing().set_masks(slots, words)

    @property
    def token_mask_words(self) -> int:
        return (self.config.vocab_size + 31) // 32

    def clear_logit_processing(self, slot: int) -> None:
        if self.state.processing is not None:
            self.state.processing.disable(slot)

    def copy_prompt(self, source: int, target: int, length: int) -> None:
        """The first `length` positions of slot `source`'s KV cache copied into slot `target` (queued
        behind the steps in flight: a prompt prefilled once serves the n choices of a request)."""
        data = self.kv_cache.data
        data[:, :, target, :, :length].copy_(data[:, :, source, :, :length])

    def count_output_token(self, slot: int, token: int) -> None:
        """A processed slot's token sampled outside a decode step (its first): added to its counts."""
        if self.state.processing is not None:
            self.state.processing.count(slot, token)

    def prefix_fingerprint(self, adapter: str, prompt_length: int) -> str:
        """What, besides the tokens, a saved prefix's KV depends on: the adapter, and for LongRoPE
        whether the prompt outgrew the original context (its keys were rotated with the long factors)."""
        long = self.longrope is not None and prompt_length > self.longrope.original
        return self.adapters.fingerprint(adapter) + ("|longrope" if long else "")

    # ---- the step objects' methods: each file holds the code and the full docstring ----

    prefill_step = _run_by("_prefill", PrefillSteps.prefill_step)
    prefill_tokens = _run_by("_prefill", PrefillSteps.prefill_tokens)
    attach_block_pools = _run_by("_prefill", PrefillSteps.attach_block_pools)
    decode_step = _run_by("_decode", DecodeSteps.decode_step)
    capture_decode_graphs = _run_by("_decode", DecodeSteps.capture_decode_graphs)
    start_decode = _run_by("_decode", DecodeSteps.start_decode)
    add_decode_rows = _run_by("_decode", DecodeSteps.add_decode_rows)
    restart_decode_rows = _run_by("_decode", DecodeSteps.restart_decode_rows)
    keep_decode_rows = _run_by("_decode", DecodeSteps.keep_decode_rows)
    end_decode = _run_by("_decode", DecodeSteps.end_decode)
    decode_sample_step = _run_by("_decode", DecodeSteps.decode_sample_step)
    decode_launch = _run_by("_decode", DecodeSteps.decode_launch)
    decode_launch_forward = _run_by("_decode", DecodeSteps.decode_launch_forward)
    decode_launch_sample = _run_by("_decode", DecodeSteps.decode_launch_sample)
    decode_logits = _run_by("_decode", DecodeSteps.decode_logits)
    mixed_launch = _run_by("_mixed", MixedSteps.mixed_launch)
    capture_mixed_graphs = _run_by("_mixed", MixedSteps.capture_graphs)
    tree_decode_step = _run_by("_verify", TreeSteps.tree_decode_step)
    commit_tree_path = _run_by("_verify", TreeSteps.commit_tree_path)

    @property
    def block_pool(self) -> torch.Tensor | None:
        return self._prefill.block_pool

    @property
    def host_block_pool(self) -> torch.Tensor | None:
        return self._prefill.host_block_pool

    @inference_call
    def verify_sample_step(self, tokens, parents, n_nodes) -> tuple[torch.Tensor, torch.Tensor]:
        """One speculative step of the running rows: a tree per row (tokens, parents [n, T], n_nodes [n]);
        returns (new tokens [n, T'], accepted drafts [n])."""
        return self._verify.verify_sample_step(self._decode.running("verify_sample_step"), tokens, parents, n_nodes)

    @inference_call
    def verify_sample_trees(self, trees: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """verify_sample_step for trees as (tokens, parents) lists: [n, T' + 1], the accepted count last."""
        return self._verify.verify_sample_trees(self._decode.running("verify_sample_step"), trees)

    # ---- what a decode loop asks between steps ----

    @property
    def takes_mixed_steps(self) -> bool:
        """Whether mixed_launch runs here (engine/mixed_steps.py): the Triton backend, no per-slot RoPE
        offsets (LongRoPE, multimodal RoPE), and Switches.mixed_steps (not batch_invariant: a decode row's
        projections would run in the chunk's GEMM, not its own GEMV)."""
        return self.backend == "triton" and self.switches.mixed_steps and not self.switches.batch_invariant \
            and self._mixed.available

    @property
    def launches_halves(self) -> bool:
        """Whether a decode step may be queued in two halves (decode_launch_forward, then
        decode_launch_sample): the Triton backend."""
        return self.backend == "triton"

    @property
    def needs_rows_each_step(self) -> bool:
        """Whether a decode loop must hand prepare_decode_rows each step's rows before the step (and so
        read every step's tokens first): LongRoPE engines, whose rows' caches may need recomputing."""
        return self.longrope is not None

    def prepare_decode_rows(self, slots: list[int], prompts: list[list[int]], generated: list[list[int]],
                            adapters: list[str]) -> None:
        """Before a decode step, with each running row's slot, prompt, tokens generated so far and adapter:
        the rows whose next step passes LongRoPE's original context get their cache recomputed with the
        long factors (a prefill with long_rope=True, in place, while the batch runs on)."""
        if self.longrope is None:
            return
        crossing = [i for i, (p, g) in enumerate(zip(prompts, generated))
                    if self.longrope.crosses_original_context(len(p), len(p) + len(g))]
        if not crossing:
            return
        token_ids = [prompts[i] + generated[i][:-1] for i in crossing]
        lengths = [len(ids) for ids in token_ids]
        ids = torch.zeros(len(token_ids), max(lengths), dtype=torch.int64)
        for row, seq in enumerate(token_ids):
            ids[row, :len(seq)] = torch.tensor(seq)
        self.prefill_step(self.embed(ids), lengths, slots=torch.tensor([slots[i] for i in crossing], dtype=torch.int32),
                          lora=[adapters[i] for i in crossing], long_rope=True)

    def max_tree_drafts(self, prompt_length: int, length: int) -> int:
        """How many drafts a row's next token tree may hold (sequence of `length` tokens, its last not
        yet cached): trees stop short of a LongRoPE switch; otherwise no limit."""
        return NO_DRAFT_LIMIT if self.longrope is None else self.longrope.max_drafts(prompt_length, length)

    # ---- LoRA adapters (adapters.py): any mix of them, or none, in one batch ----

    @inference_call
    def add_lora_weights(self, name: str, path, *, rank: int | None = None, alpha: float | None = None) -> None:
        """Load an adapter under `name`: a PEFT directory, or a bare .safetensors file with its `alpha`
        (rank from the tensors; a given `rank` must agree). Checked in full before anything is written."""
        self.adapters.add(name, path, rank, alpha)

    @inference_call
    def remove_lora_weights(self, name: str) -> None:
        slot = self.adapters.slot(name)
        if slot < 0:
            raise LoraError("remove_lora_weights needs an adapter name ('' is the base model)")
        if self._decode.holds_adapter(slot):
            raise LoraError(f"LoRA adapter {name!r} is in use by the running decode batch (end_decode() first)")
        self.adapters.remove(name)

    @inference_call
    def switch_lora_weights(self, name: str) -> bool:
        """Make `name` the adapter used when a call names none ("" = the base model). The KV cache and
        the model weights are untouched."""
        self.adapters.switch(name)
        return True

    def get_available_lora_weights(self) -> list[str]:
        return self.adapters.names()

    def get_active_lora_weights_name(self) -> str:
        return self.adapters.active

    def lora_slot(self, name: str | None) -> int:
        """The stack slot of adapter `name` (None: the active adapter; "": -1, the base model)."""
        return self.adapters.slot(name)
