"""EngineState: what every step of one engine reads. The model's config and weights, the KV cache, the
RoPE tables, the reduced vocabulary's map and the settings (engine/switches.py), made once by the
runner and handed to each step object (prefill_steps.py, decode_steps.py, verify.py), which owns its
own buffers and graphs on top."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..errors import InvalidRequestError
from ..kernels import ops
from ..kernels.dispatch import run_with
from . import cpu_forward
from .config import EngineConfig
from .kv_cache import LinearKVCache
from .logit_processing import LogitProcessing, step_logprobs
from .model import RopeTables, forward_logits, forward_mixed
from .switches import Switches
from .weights import ModelWeights


@dataclasses.dataclass
class EngineState:
    config: EngineConfig
    device: torch.device
    dtype: torch.dtype
    weights: ModelWeights
    kv_cache: LinearKVCache
    rope: RopeTables
    switches: Switches
    vocab_map: torch.Tensor | None = None  # int32 [reduced]: logits column -> full token id
    longrope_original: int | None = None  # LongRoPE's original context length (engine/longrope.py)
    processing: LogitProcessing | None = None  # per-slot penalties, bias and min_p (made by the runner)

    def __post_init__(self):
        self._run_changes = self.switches.run_settings()

    def running(self):
        """The block a step's kernels launch in: the kernels' RunSettings the switches change."""
        return run_with(**self._run_changes) if self._run_changes else contextlib.nullcontext()

    def forward(self, embeds: torch.Tensor, slots, starts, q_lens, decode_step: bool = False, **options):
        """model.forward_logits over this engine's weights, cache and RoPE tables, with its switches.
        decode_step: the step is a decode step (RunSettings.decode_step: what sends rows to the GEMV
        when the switches are batch-invariant)."""
        with self.running(), run_with(decode_step=decode_step):
            return forward_logits(self.weights, self.config, self.kv_cache, self.rope, embeds, slots, starts, q_lens,
                                  switches=self.switches, **options)

    def forward_mixed(self, parts, lora=None):
        """model.forward_mixed over this engine's weights, cache and RoPE tables (engine/mixed_steps.py)."""
        with self.running():
            return forward_mixed(self.weights, self.config, self.kv_cache, self.rope, parts, lora)

    def sample(self, logits: torch.Tensor, temperature, top_k, top_p, seeds, offsets, group: int = 1,
               slots: torch.Tensor | None = None, count: bool = False,
               logprobs: torch.Tensor | None = None) -> torch.Tensor:
        """Sampled tokens (kernels/sampling.py), as full-vocabulary ids. slots: the rows' KV slots, given
        where the step processes logits (engine/logit_processing.py, before the draw); count: the draws
        are the rows' next output tokens (a decode step's), added to their slots' counts; logprobs: a
        [rows, LOGPROB_WIDTH] buffer the draws' logprobs go to (from the logits before processing)."""
        threads = cpu_forward.one_torch_thread() if self.device.type == "cpu" and self.switches.cpu_blas \
            else contextlib.nullcontext()
        with self.running(), threads:
            raw = logits
            if slots is not None:
                logits = self.processing.process(logits.clone() if logprobs is not None else logits, slots)
            columns = ops.sample(logits, temperature, top_k, top_p, seeds, offsets, group=group)
            if slots is not None and count:
                self.processing.count_sampled(columns, slots)
            if logprobs is not None:
                step_logprobs(raw, columns, self.full_ids, logprobs)
            return self.full_ids(columns)

    @property
    def processing_active(self) -> bool:
        """Some slot processes its logits now: steps launched now run the processing kernels."""
        return self.processing is not None and self.processing.processing

    @property
    def logprobs_active(self) -> bool:
        """Some slot reports logprobs now: steps launched now write them."""
        return self.processing is not None and self.processing.logprobs

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [...] -> input embeddings [..., hidden] in the engine dtype."""
        return torch.nn.functional.embedding(input_ids.to(self.device), self.weights.embed)

    def full_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids sampled from (or picked out of) this engine's logits, as full-vocabulary ids (int64):
        the identity without a reduced vocabulary."""
        return ids if self.vocab_map is None else ops.vocab_remap(ids, self.vocab_map)

    def slots(self, slots, batch: int, on_device: bool = True) -> torch.Tensor:
        """The rows' cache slots (default 0..batch-1), int32, checked when they come from the host; on
        the device, or (on_device=False) on the host (device tensors are brought back: rare)."""
        return check_slots(slots, batch, self.config.max_supported_batch_size, self.device if on_device else "cpu")


def check_slots(slots, batch: int, max_batch: int, device) -> torch.Tensor:
    """EngineState.slots for any engine (the exported backends' too)."""
    if slots is None:
        return torch.arange(batch, dtype=torch.int32, device=device)
    slots = torch.as_tensor(slots, dtype=torch.int32)
    if slots.device.type == "cpu":  # the host-side check is free here (device tensors are the caller's)
        if slots.shape != (batch,) or slots.unique().numel() != batch or slots.min() < 0 or slots.max() >= max_batch:
            raise InvalidRequestError(f"slots must be {batch} distinct values in [0, {max_batch})")
    return slots.to(device)
