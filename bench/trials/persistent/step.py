"""The persistent decode step's glue: the layers in one launch (megakernel.py), then the final norm and
the LM head as the kernel chain runs them. The trial ran inside the runner's decode graphs as a mode
(H100 figures in bench/RESULTS.md, "Persistent decode kernel"); out of the package it runs on a
runner's weights and a cache of its own (bench.py, test_megakernel.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import megakernel  # noqa: E402
from edgellm.engine.model import RopeTables, _linear  # noqa: E402


def persistent_logits(plan, weights, cfg, rope: RopeTables, embeds: torch.Tensor, slots: torch.Tensor,
                      starts: torch.Tensor, ops) -> torch.Tensor:
    """forward_logits for one decode row (embeds [1, 1, H]): the layers in one launch, then the final
    norm and the LM head (keys and values go to the plan's KV cache). Returns [1, vocab] float32."""
    residual = megakernel.persistent_decode(plan, embeds.reshape(-1), rope.cos, rope.sin, slots, starts,
                                            cfg.rms_norm_eps, cfg.attention_scale)
    final = ops.rms_norm(residual[None], weights.final_norm, cfg.rms_norm_eps)
    return _linear(final, weights.lm_head, None, ops).float()
