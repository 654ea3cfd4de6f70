"""Phi-3 / Phi-4-mini (Phi3ForCausalLM): the llama layout with q/k/v and gate/up stored fused (in the
order edgellm fuses them, so taken as stored), partial rotary (rope_parameters' partial_rotary_factor,
read for every family by config.py), LongRoPE scaling (kernels/rope.py, runner.py) and a sliding
window over every layer when the config sets one."""

from __future__ import annotations

from . import llama

MODEL_TYPES = ("phi3",)


def describe(hf: dict) -> tuple[dict, dict]:
    hf, switches = llama.describe(hf)
    return hf, {**switches, "layer_windows": llama.sliding_windows(hf, every_layer=True)}


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    return llama.expected_shapes(cfg, fused=True)


def load(cfg, t):
    return llama.load(cfg, t, fused=True)
