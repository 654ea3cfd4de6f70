"""The persistent decode step (kernels/megakernel.py) behind the runner: when it runs, and the logits.

Graph mode (DESIGN's graph key): "persistent" runs a batch-1 decode step's layers in one launch,
then the final norm, the LM head and sampling as in the chain; "chain" is the kernel-per-op path of
model.forward_logits. EDGELLM_DECODE=chain|persistent forces one. The default is the chain: measured
on the H100 (RESULTS.md), the persistent step beat the chain of separate ops where a step is
latency-bound (SmolLM2-135M shape: 1630 against 1414 tok/s) but not the chain with the norms,
SiLU * up and residual adds fused into its GEMVs (1901 against 1624); and it loses where it streams
large matrices (Llama-3.2-1B shape, 121 MB per layer: 0.69-0.78x, its GEMV tiles reaching 55-70% of
the bandwidth that the chain's many small programs reach). It stays as a mode for A/B runs and as the
base of the work on a one-launch step.
"""

from __future__ import annotations

import os

import torch

from ..errors import ConfigurationError
from ..kernels import megakernel
from .model import RopeTables, _linear

MODES = ("chain", "persistent")


def requested_mode() -> str | None:
    """EDGELLM_DECODE, checked: "chain", "persistent" or None (automatic)."""
    mode = os.environ.get("EDGELLM_DECODE", "").strip().lower() or None
    if mode is not None and mode not in MODES:
        raise ConfigurationError(f"EDGELLM_DECODE must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def plan_for(cfg, weights, cache: torch.Tensor, rope: RopeTables, longrope: bool, mode: str | None = None):
    """The megakernel's plan for this engine when the persistent mode is asked for (mode, default
    EDGELLM_DECODE), else None: the chain. A forced mode that cannot run raises, saying why."""
    mode = mode or requested_mode()
    if mode != "persistent":
        return None
    why = megakernel.supports(cfg, weights, cache.dtype)
    if why is None and cache.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        why = "a CPU device without the Triton interpreter (TRITON_INTERPRET=1)"
    if why is None and (longrope or rope.local is not None or rope.offsets is not None):
        why = "LongRoPE, per-layer RoPE tables or multimodal RoPE"
    if why is not None:
        if mode == "persistent":
            raise ConfigurationError(f"EDGELLM_DECODE=persistent cannot run this model: {why}")
        return None
    return megakernel.make_plan(cfg, weights, cache)


def persistent_logits(plan, weights, cfg, rope: RopeTables, embeds: torch.Tensor, slots: torch.Tensor,
                      starts: torch.Tensor, ops) -> torch.Tensor:
    """forward_logits for one decode row (embeds [1, 1, H]): the layers in one launch, then the final
    norm and the LM head (keys and values go to the plan's KV cache). Returns [1, vocab] float32."""
    residual = megakernel.persistent_decode(plan, embeds.reshape(-1), rope.cos, rope.sin, slots, starts,
                                            cfg.rms_norm_eps, cfg.attention_scale)
    final = ops.rms_norm(residual[None], weights.final_norm, cfg.rms_norm_eps)
    return _linear(final, weights.lm_head, None, ops).float()
