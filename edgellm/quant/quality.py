"""How much quantization costs: perplexity of an engine on a text (teacher-forced; the default model's
tests and benchmarks use tests/data/eval_prose.txt)."""

from __future__ import annotations

import math

import torch

from ..engine.model import forward_logits


def token_windows(ids: list[int], window: int) -> list[list[int]]:
    """Consecutive windows of `window` tokens (the last may be shorter), each scored from scratch."""
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]


@torch.inference_mode()
def perplexity(runner, ids: list[int], *, window: int = 512, kernels=None) -> float:
    """exp(mean negative log-likelihood) of each token given the ones before it in its window, over
    all windows (the first token of a window is not scored). kernels: the ops namespace (default the
    dispatched ops; reference_ops() on a CPU is fastest)."""
    if window > runner.config.max_supported_input_length:
        raise ValueError(f"window {window} exceeds the engine's max_input_length {runner.config.max_supported_input_length}")
    total, count = 0.0, 0
    device = runner.device
    for chunk in token_windows(ids, window):
        tokens = torch.tensor([chunk], device=device)
        zero = torch.zeros(1, dtype=torch.int32, device=device)
        logits = forward_logits(runner.weights, runner.config, runner.kv_cache, runner.rope, runner.embed(tokens),
                                zero, zero, torch.tensor([len(chunk)], dtype=torch.int32, device=device),
                                kernels=kernels, every_token=True)[0]
        nll = torch.nn.functional.cross_entropy(logits[:-1].float(), tokens[0, 1:], reduction="sum")
        total += float(nll)
        count += len(chunk) - 1
    return math.exp(total / count)
