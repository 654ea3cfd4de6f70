"""LLMInferenceRuntime: requests in, responses out.

Owns the tokenizer, one LLMEngineRunner and the engine loop. The path of a request through the code, in order:
  requests.py        LLMGenerationRequest checked (validate_request), its sampling settings and stops;
  runtime.py         submit (handle_request: submit, stream, result) runs _prepare: each item's prompt ids
                     (tokenizer.py: chat template or plain text), limits and adapter checked before any
                     model work; each item becomes a Sequence (serving/sequence.py) with its own seed;
  serving/           the scheduler (scheduler.py) queues the sequences and admits them into free KV
                     slots; the engine loop's thread (engine_loop.py) prefills their prompts in chunks
                     beside the running rows' decode steps, samples their first tokens and adds them to
                     the runner's decode batch (add_decode_rows), then per step decode_sample_step;
  engine/runner.py   prefill_tokens, sample, add_decode_rows / decode_sample_step / keep_decode_rows;
                     its docstring follows a step on from there, through engine/ to kernels/;
  streaming.py       advance_rows: each row's new tokens, finish reasons, incremental text, stop strings
                     and streamed deltas (queued to the caller's thread: RequestHandle.stream);
  requests.py        LLMGenerationResponse with texts, ids, finish reasons and timings.
With KV reuse the loop restores each admitted prompt's longest saved prefix (engine/kv_store.py) and
saves its new blocks once prefilled; with speculation the runtime's proposer (speculative/) drafts for
each row in its slot and verify_sample_trees checks the batch's trees; a vision model's items carry
their images (multimodal.py, vision/), written over the prompt's embeddings when it is prefilled.

Threads: whatever touches the engine (the loop while it has work, adding/removing/switching LoRA
adapters, flushing the KV store, exclusive() blocks, in which handle_request drives the loop on the
caller's thread) runs in a turn of one FifoLock, first come first served; the getters read snapshots
and never wait. `_engine_turn` is the one door every engine call takes.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import threading
import time
import weakref
from pathlib import Path
from typing import Callable

import torch

from .engine.backends.export_format import is_export
from .engine.kv_store import KVReuseSettings, KVReuseStats, TieredKVStore, model_identity
from .engine.devices import resolve_device, resolve_dtype
from .engine.logit_processing import LogitSettings
from .engine.runner import LLMEngineRunner
from .engine.switches import Switches
from .errors import (ConfigurationError, GrammarError, InvalidRequestError, LoraError, ReentrantRequestError, TokenizerError,
                     VocabMapError)
from .fifo_lock import FifoLock
from .grammar import GrammarSpec, grammar_spec
from .models import generation_config, resolve_model_dir, stop_token_ids
from .multimodal import ImagePrompt, ImagePrompts, image_sources, template_messages
from .serving.engine_loop import EngineLoop
from .serving.request_handle import RequestHandle, respond
from .serving.sequence import Sequence
from .requests import (GenerationItem, LLMGenerationRequest, LLMGenerationResponse, item_seeds, logit_settings,
                       sampling_settings, stop_strings, validate_request)
from .speculative import SpeculativeConfig, Speculation, make_proposer
from .streaming import GenerationRow, RowText
from .tokenizer import Tokenizer
from .tool_calls import generic_tool_messages, renders_tools
from .engine.vocab_map import MAP_FILE
from .vision import VisionEncoder, vision_config_of
from .vision.graphs import GRAPH_MAX_PATCHES

# Called as on_text(item_index, text_delta) while generating, for streaming output.
TextCallback = Callable[[int, str], None]

log = logging.getLogger("edgellm")


class LLMInferenceRuntime:
    def __init__(self, model_dir: str | Path | None = None, *, device=None, dtype=None,
                 max_batch_size: int | None = None, max_input_length: int | None = None,
                 max_kv_cache_capacity: int | None = None, cuda_graphs: bool = True,
                 prefill_chunk_size: int | None = None, lora_weights: dict | None = None,
                 max_lora_rank: int | None = None, max_loras: int | None = None,
                 kv_reuse: KVReuseSettings | None = None, speculative: SpeculativeConfig | None = None,
                 reduced_vocab_dir: str | Path | bool | None = None, quantization: str | None = None,
                 quantize_lm_head: bool = False, max_queued: int | None = None,
                 prefill_budget: int | None = None, deterministic: bool = False):
        """model_dir=None runs the embedded default model (SmolLM2-135M-Instruct); a directory `edgellm
        export` wrote runs its graph on onnxruntime (the base model only: no LoRA, KV reuse, speculation,
        reduced vocabulary or quantization). cuda_graphs,
        prefill_chunk_size, lora_weights ({name: adapter path}), max_lora_rank and max_loras are the
        engine settings of LLMEngineRunner. kv_reuse: save prompts' KV in blocks and reuse the longest
        saved prefix of later prompts (engine/kv_store.py; tiers and budgets in KVReuseSettings);
        None (the default) reuses nothing. speculative: speculative decoding (edgellm/speculative;
        n-gram prompt lookup or a draft model), None (the default) decodes one token per step.
        reduced_vocab_dir: a directory with vocab_map.safetensors (`edgellm reduce-vocab`): logits and
        sampling cover only those tokens; None (the default) uses the model directory's
        vocab_map.safetensors when there is one; False never reduces. quantization ("int8", "int4",
        "fp8") and quantize_lm_head: weight-only quantization at load (LLMEngineRunner). max_queued: how
        many sequences (request items) may wait for a KV slot before submit() refuses more with
        QueueFullError (default: no bound). prefill_budget: prompt tokens a step of the engine loop
        prefills inside the running rows' decode step (default 384; serving/engine_loop.py).
        deterministic: batch-invariant decoding (Switches.batch_invariant, also EDGELLM_BATCH_INVARIANT=1):
        a request's logits, and so its tokens for a seed, come out bitwise the same whatever else runs
        beside it and wherever a reused prefix ends; without it, the same batch gives the same output run
        after run, but a row's last bits may change with its batch-mates (README: Deterministic decoding)."""
        if max_queued is not None and (not isinstance(max_queued, int) or max_queued < 1):
            raise ConfigurationError(f"max_queued must be a positive integer or None, got {max_queued!r}")
        if prefill_budget is not None and (not isinstance(prefill_budget, int) or prefill_budget < 1):
            raise ConfigurationError(f"prefill_budget must be a positive integer or None, got {prefill_budget!r}")
        if kv_reuse is not None:
            if not isinstance(kv_reuse, KVReuseSettings):
                raise ConfigurationError(f"kv_reuse must be a KVReuseSettings or None, got {type(kv_reuse).__name__}")
            kv_reuse.check()  # before the model loads
        if speculative is not None:
            if not isinstance(speculative, SpeculativeConfig):
                raise ConfigurationError(f"speculative must be a SpeculativeConfig or None, got "
                                         f"{type(speculative).__name__}")
            speculative.check()
        self.speculative = speculative
        self._engine_lock = FifoLock()
        self._stats_lock = threading.Lock()  # kv_reuse_stats reads totals a request's end may be adding to
        self.model_dir = resolve_model_dir(model_dir)
        exported = is_export(self.model_dir)  # an `edgellm export` directory: its graph runs on onnxruntime
        if exported and kv_reuse is not None:
            raise ConfigurationError("KV reuse needs the triton backend; this is an exported graph (onnxruntime)")
        # The KV store's device tier is allocated beside the engine: the runner's up-front memory
        # check counts it.
        reuse_device = {"KV reuse device tier (KVReuseSettings.gpu_bytes)": kv_reuse.gpu_bytes} \
            if kv_reuse is not None else {}
        vision = vision_config_of(self.model_dir)  # None: a text-only model
        if vision is not None:
            element = torch.empty(0, dtype=resolve_dtype(dtype, resolve_device(device))).element_size()
            reuse_device["vision encoder weights"] = vision.parameter_count * element
            if cuda_graphs and resolve_device(device).type == "cuda":
                reuse_device["vision encoder graphs' pool"] = vision.graph_bytes(GRAPH_MAX_PATCHES, element)
        self.runner = LLMEngineRunner(self.model_dir, backend="onnxruntime" if exported else "triton",
                                      device=device, dtype=dtype, max_batch_size=max_batch_size,
                                      max_input_length=max_input_length,
                                      max_kv_cache_capacity=max_kv_cache_capacity, cuda_graphs=cuda_graphs,
                                      prefill_chunk_size=prefill_chunk_size, lora_weights=lora_weights,
                                      max_lora_rank=max_lora_rank, max_loras=max_loras,
                                      max_verify_tokens=speculative.max_verify_tokens if speculative else 0,
                                      extra_device_bytes=reuse_device or None,
                                      vocab_map=self._vocab_map_path(reduced_vocab_dir),
                                      quantization=quantization, quantize_lm_head=quantize_lm_head,
                                      switches=self._switches(deterministic))
        self.config = self.runner.config
        self.vision = ImagePrompts(VisionEncoder(self.model_dir, vision, device=self.runner.device,
                                                 dtype=self.runner.dtype, cuda_graphs=cuda_graphs),
                                   self.config.max_supported_input_length) if vision is not None else None
        try:
            self.tokenizer: Tokenizer | None = Tokenizer.from_dir(self.model_dir)
            self._tokenizer_error = None
        except TokenizerError as exc:  # input_ids requests still work; text requests get this error
            self.tokenizer, self._tokenizer_error = None, exc
        self.generation_defaults = generation_config(self.model_dir)
        self.eos_token_ids = self._eos_ids()
        self._grammars = None  # the grammar engine of structured output, made on first use
        if self.runner.vocab_map is not None:
            missing = sorted(self.eos_token_ids - set(self.runner.vocab_map.tolist()))
            if missing:
                raise VocabMapError(f"the reduced vocabulary lacks stop token ids {missing} (from generation_config.json "
                                    "or the tokenizer): generation could never end; rebuild the map with them")
        self.kv_store = None if kv_reuse is None else \
            TieredKVStore(self.runner.kv_cache, kv_reuse, model_identity(self.model_dir, self.config.quantization))
        if self.kv_store is not None:  # a KV hit's memory-tier blocks are copied inside the prefill step
            self.runner.attach_block_pools(*self.kv_store.pools())
        self._kv_totals = KVReuseStats()
        self._proposer = make_proposer(speculative, self.runner) if speculative is not None else None
        if self.kv_store is not None:  # pending disk writes finish before the process exits
            atexit.register(_flush_store, weakref.ref(self.kv_store))
        self._loop = EngineLoop(self.runner, self._engine_turn, max_queued=max_queued,
                                prefill_budget=prefill_budget, kv_store=self.kv_store, vision=self.vision)
        atexit.register(_stop_loop, weakref.ref(self._loop))  # (registered after the store's flush: runs first)

    def close(self) -> None:
        """Finish pending work that outlives a request (the KV store's disk writes). The runtime stays usable."""
        if self.kv_store is not None:
            with self._engine_turn():
                self.kv_store.flush()

    def serving_stats(self) -> dict:
        """A snapshot of the engine loop: sequences waiting for a KV slot, rows running (prefilling or
        decoding), and the steps run so far by kind (decode, mixed, prefill, verify)."""
        loop = self._loop
        return {"waiting": len(loop.scheduler.waiting), "running": len(loop.scheduler.running),
                "steps": dict(loop.step_counts)}

    @staticmethod
    def _switches(deterministic: bool) -> Switches:
        """The environment's switches (engine/switches.py), batch-invariant where asked."""
        if not isinstance(deterministic, bool):
            raise ConfigurationError(f"deterministic must be True or False, got {deterministic!r}")
        switches = Switches.from_environment()
        return dataclasses.replace(switches, batch_invariant=True) if deterministic else switches

    def kv_reuse_stats(self) -> KVReuseStats:
        """KV reuse over this runtime's life (a copy); each response carries its own."""
        with self._stats_lock:
            return dataclasses.replace(self._kv_totals)

    # ------------------------------------------------------------------ turns on the engine
    @contextlib.contextmanager
    def _engine_turn(self):
        """Hold the lock every engine call holds (FIFO, re-entrant): the engine loop while it has work,
        LoRA changes, close() and exclusive() blocks."""
        with self._engine_lock:
            yield

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the engine for a block of your own: other threads' requests wait until it ends (the
        engine loop finishes what it runs first). For driving `runtime.runner` directly while other
        threads use the runtime; a handle_request inside the block runs the loop's steps on this
        thread until it is done (only its own items: the others keep waiting for the block's end)."""
        with self._engine_turn():
            yield self.runner

    def capture_graphs(self, lora: bool = False) -> int:
        """Capture up front the CUDA graphs the engine loop replays: decode steps of every padded batch
        size, and mixed steps (a decode step with a prompt chunk of up to prefill_budget tokens, every
        length bucket) beside each; lora=True: those of batches with adapters too. A missing graph is
        captured on first use instead, while the running rows wait (with the Triton compiles of a new
        shape, up to a second). Returns how many graphs the engine holds (0 without CUDA graphs)."""
        if self.runner.backend != "triton":
            return 0
        with self._engine_turn():
            runner = self.runner
            for uses in (False, True) if lora else (False,):
                runner.capture_decode_graphs(lora=uses)
                if runner.takes_mixed_steps:
                    runner.capture_mixed_graphs(self._loop.prefill_budget, lora=uses)
            return len(runner.graphs.graphs) if runner.graphs.enabled else 0

    # ------------------------------------------------------------------ setup helpers
    def _eos_ids(self) -> frozenset[int]:
        return stop_token_ids(self.config.eos_token_ids, self.generation_defaults, self.tokenizer)

    def _vocab_map_path(self, reduced_vocab_dir) -> Path | None:
        if reduced_vocab_dir is False:
            return None
        if reduced_vocab_dir is None:
            found = self.model_dir / MAP_FILE
            return found if found.is_file() else None
        if not isinstance(reduced_vocab_dir, (str, Path)) or reduced_vocab_dir is True:
            raise ConfigurationError(f"reduced_vocab_dir must be a directory, None or False, got {reduced_vocab_dir!r}")
        return Path(reduced_vocab_dir)

    # ------------------------------------------------------------------ LoRA adapters (the runner's)
    def add_lora_weights(self, name: str, path, *, rank: int | None = None, alpha: float | None = None) -> None:
        """Load a PEFT adapter directory (or a bare .safetensors file with its alpha) under `name`."""
        with self._engine_turn():
            self.runner.add_lora_weights(name, path, rank=rank, alpha=alpha)

    def remove_lora_weights(self, name: str) -> None:
        with self._engine_turn():
            self.runner.remove_lora_weights(name)

    def switch_lora_weights(self, name: str) -> bool:
        """The adapter of requests that name none ("" = the base model); the KV cache is kept."""
        with self._engine_turn():
            return self.runner.switch_lora_weights(name)

    def get_available_lora_weights(self) -> list[str]:
        return self.runner.get_available_lora_weights()

    def get_active_lora_weights_name(self) -> str:
        return self.runner.get_active_lora_weights_name()

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.runner.dtype

    # ------------------------------------------------------------------ validation
    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise self._tokenizer_error
        return self.tokenizer

    def _prompt_ids(self, item: GenerationItem, index: int) -> list[int]:
        if item.input_ids is not None:
            ids = list(item.input_ids)
            vocab = self.config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"request item {index}: token ids {bad[:5]} are outside the "
                                          f"vocabulary [0, {vocab})")
            return ids
        if self.vision is None and image_sources(item):  # before a text model's template sees image parts
            raise InvalidRequestError(f"request item {index}: this model ({self.model_dir.name}) is text-only "
                                      "and takes no images")
        tokenizer = self._require_tokenizer()
        if item.messages is not None:
            messages, tools = item.messages, item.tools
            if tools and not renders_tools(tokenizer.chat_template):  # (tools written into the messages instead)
                messages, tools = generic_tool_messages(messages, tools), None
            ids = tokenizer.encode_chat(template_messages(messages, text_only=self.vision is None), tools)
        else:
            ids = tokenizer.encode(item.prompt)
        if not ids:
            raise InvalidRequestError(f"request item {index}: the prompt encodes to no tokens")
        return ids

    def _prepare(self, request: LLMGenerationRequest):
        cfg = self.config
        items = validate_request(request, max_batch_size=cfg.max_supported_batch_size)
        sampling = sampling_settings(request, self.generation_defaults)
        processing = logit_settings(request, self.config.vocab_size)
        if (processing is not None or request.logprobs is not None) and self.runner.backend != "triton":
            raise InvalidRequestError("presence/frequency/repetition penalties, logit_bias, min_p and logprobs need "
                                      f"the triton backend (this runtime runs {self.runner.backend})")
        stops = stop_strings(request)
        if stops:
            self._require_tokenizer()
        grammars = [self._grammar_spec(item.response_format if item.response_format is not None
                                       else request.response_format, i) for i, item in enumerate(items)]
        if any(grammars):
            if self.runner.backend != "triton":
                raise InvalidRequestError(f"structured output needs the triton backend (this runtime runs "
                                          f"{self.runner.backend})")
            if request.ignore_eos:
                raise InvalidRequestError("structured output ends at the grammar's end of sequence: ignore_eos "
                                          "cannot be set with response_format")
            backend = self._grammar_backend()
            for spec in set(filter(None, grammars)):
                backend.compile(spec)  # (a bad schema or regex refused here, before any model work)
            processing = processing or LogitSettings()  # (a masked slot runs the processing kernels)
        prompts, images = [], []
        preprocess_ms = 0.0
        for i, item in enumerate(items):
            ids = self._prompt_ids(item, i)
            began = time.perf_counter()
            placed = self._place_images(item, ids, i)
            preprocess_ms += (time.perf_counter() - began) * 1e3
            prompts.append(placed.ids if placed is not None else ids)
            images.append(placed)
        adapters = [self._adapter(item.lora_weights_name if item.lora_weights_name is not None
                                  else request.lora_weights_name, i) for i, item in enumerate(items)]
        limits = []
        for i, ids in enumerate(prompts):
            if len(ids) > cfg.max_supported_input_length:
                raise InvalidRequestError(f"request item {i}: prompt has {len(ids)} tokens, more than the "
                                          f"engine's max_input_length {cfg.max_supported_input_length}")
            room = cfg.max_kv_cache_capacity - len(ids)
            if room < 1 or (request.max_generate_length or 0) > room:
                raise InvalidRequestError(
                    f"request item {i}: prompt of {len(ids)} tokens + max_generate_length "
                    f"{request.max_generate_length or 1} exceeds the KV cache capacity {cfg.max_kv_cache_capacity}; "
                    f"max_generate_length may be at most {room} for this prompt")
            limits.append(request.max_generate_length or room)
        return prompts, images, preprocess_ms, sampling, stops, adapters, limits, processing, grammars

    def _grammar_spec(self, value, index: int):
        """An item's constraint as a GrammarSpec (None: free text)."""
        if value is None or isinstance(value, GrammarSpec):
            return value
        try:
            return grammar_spec(value)
        except GrammarError as exc:
            raise GrammarError(f"request item {index}: {exc}") from None

    def _grammar_backend(self):
        """The tokenizer's grammar engine (edgellm/grammar/backend.py), made on first use."""
        if self._grammars is None:
            from .grammar.backend import GrammarBackend

            tokenizer = self._require_tokenizer()
            self._grammars = GrammarBackend(tokenizer, self.config.vocab_size, self.eos_token_ids)
        return self._grammars

    def _place_images(self, item: GenerationItem, ids: list[int], index: int) -> ImagePrompt | None:
        """The item's images loaded, preprocessed and placed in its prompt (None: an item without images)."""
        if self.vision is None:  # (_prompt_ids refused images already)
            return None
        return self.vision.place_item(item, ids, index, mrope=self.config.mrope_section is not None)

    def _adapter(self, name: str | None, index: int) -> str:
        """The adapter name item `index` runs with (None: the active one), checked to be loaded."""
        name = self.runner.get_active_lora_weights_name() if name is None else name
        try:
            self.runner.lora_slot(name)
        except LoraError as exc:
            raise InvalidRequestError(f"request item {index}: {exc}") from exc
        return name

    # ------------------------------------------------------------------ generation
    def submit(self, request: LLMGenerationRequest, *, priority: int = 0) -> RequestHandle:
        """Queue `request` on the engine loop and return at once: its items join the running batch as
        KV slots free up (lower `priority` values first, then arrival order), each with its own
        sampling settings, seed, stops, limits and adapter. The handle streams (`handle.stream()`:
        (item, text delta) pairs), waits (`handle.result()`: the LLMGenerationResponse handle_request
        returns), reports (`handle.done()`) and cancels (`handle.cancel()`). Bad requests raise here,
        before any model work; QueueFullError where max_queued sequences already wait."""
        if self._engine_lock.owned:
            raise ReentrantRequestError("submit() inside runtime.exclusive(): the engine loop cannot run until the "
                                        "block ends; call handle_request there (it runs in the block)")
        return self._submit(request, priority)

    def _submit(self, request: LLMGenerationRequest, priority: int) -> RequestHandle:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidRequestError(f"priority must be an integer, got {priority!r}")
        prompts, images, preprocess_ms, sampling, stops, adapters, limits, processing, grammars = self._prepare(request)
        spec = None
        if self._proposer is not None and request.speculative is not False:  # (each row joins it in its slot)
            config = self.speculative
            spec = Speculation(self._proposer, prompts, config.max_verify_tokens - 1, config.adaptive)
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        sequences = [Sequence(prompt=ids, temperature=sampling.temperature, top_k=sampling.top_k,
                              top_p=sampling.top_p, seed=seed,
                              max_new=limit, adapter=adapter,
                              row=GenerationRow(len(ids), RowText(decode, stops, True) if decode else None),
                              eos_token_ids=frozenset() if request.ignore_eos else self.eos_token_ids,
                              priority=priority,
                              reuse=KVReuseStats() if self.kv_store is not None else None, spec=spec, spec_row=i,
                              image=image, processing=processing, logprobs=request.logprobs,
                              grammar=self._grammars.row(constraint) if constraint is not None else None)
                     for i, (ids, image, adapter, limit, seed, constraint) in enumerate(zip(
                         prompts, images, adapters, limits, item_seeds(sampling, len(prompts)), grammars))]
        _share_prompts(sequences)
        handle = RequestHandle(sequences, self._loop.wake, self._respond)
        handle.image_preprocess_ms = preprocess_ms
        self._loop.submit(handle)
        return handle

    def _respond(self, handle: RequestHandle) -> LLMGenerationResponse:
        """A finished handle's response (on the loop's thread), its KV reuse added to the runtime's."""
        response = respond(handle)
        if response.kv_reuse is not None:
            self._log_reuse(response.kv_reuse)
        return response

    def _log_reuse(self, reuse: KVReuseStats) -> None:
        with self._stats_lock:
            self._kv_totals.add(reuse)
            hit_rate = self._kv_totals.hit_rate
        log.info("%s (this request); cumulative hit rate %.2f", reuse.log_line(), hit_rate)

    def handle_request(self, request: LLMGenerationRequest, *,
                       on_text: TextCallback | None = None) -> LLMGenerationResponse:
        """Generate for every item of `request`. `on_text(i, delta)` streams item i's text (called on
        this thread). Safe from several threads: their requests share the running batch (submit).
        Inside `exclusive()` the engine loop's steps run on this thread until the request is done."""
        if self._loop.on_loop_thread:
            raise ReentrantRequestError("handle_request was called on the engine loop's thread")
        if on_text is not None:
            self._require_tokenizer()
        inline = self._engine_lock.owned  # (inside exclusive(): the loop's thread waits for this block)
        handle = self._submit(request, 0)
        try:
            pieces = self._loop.run_until(handle) if inline else handle.stream()
            for item, delta in pieces:
                if on_text is not None:
                    on_text(item, delta)
        except BaseException:
            handle.cancel()
            raise
        return handle.result()


def _share_prompts(sequences: list[Sequence]) -> None:
    """Items of one request with the same prompt and adapter (n choices, text only) follow the first:
    it prefills the prompt once for all of them (Sequence.leader)."""
    first: dict = {}
    for seq in sequences:
        if seq.image is None and len(seq.prompt) > 1:
            leader = first.setdefault((tuple(seq.prompt), seq.adapter), seq)
            if leader is not seq:
                seq.leader = leader


def _stop_loop(loop_ref) -> None:
    loop = loop_ref()
    if loop is not None:
        loop.stop()


def _flush_store(store_ref) -> None:
    store = store_ref()
    if store is not None:
        store.flush()
