"""Activation-aware int4: GPTQ-style error compensation at quantize time (Frantar et al., 2022).

Round to nearest quantizes each weight alone. GPTQ quantizes a layer's weight column by column (input
features in order) and, after each column, spreads that column's rounding error over the columns not
yet quantized, in proportion to how the layer's inputs correlate: H = X^T X over a calibration text's
activations. What the layer outputs on inputs like the calibration ones then moves far less than the
weights do. Groups of 128 (asymmetric, as formats.py's int4) take their scale and zero from the
error-compensated weights when the quantizer reaches the group's first column.

calibrate() runs the full-precision engine once over the calibration tokens and accumulates H for
every layer linear weight (through the forward's observe_linear hook); quantize_engine() replaces the
engine's linear weights with their packed GPTQ versions.

Status (bench/RESULTS.md, issue 17): on the default model GPTQ cuts every layer's error on the
calibration text several times over, yet raises perplexity (+113% against round-to-nearest's +65%,
mostly through the q/k/v projection), with 1.3k or 6.6k calibration tokens, float64 inverses, or
outsized tokens scaled down. Not offered to users until that is understood.
"""

from __future__ import annotations

import types

import torch

from ..kernels.ops import reference_ops
from .formats import GROUP_SIZE, QuantizedWeight, pack_int4
from .quality import token_windows

BLOCK = 128  # columns quantized between the (lazy) updates of the rest of the matrix


@torch.inference_mode()
def calibrate(runner, ids: list[int], *, window: int = 512) -> dict[int, torch.Tensor]:
    """{id(weight): H [K, K] float32} for each layer linear weight of the engine, from its inputs over
    `ids` (windows of `window` tokens, float32 references: run on the CPU or the GPU)."""
    from ..engine.model import forward_logits
    from ..engine.weights import LINEAR_FIELDS

    wanted = {id(getattr(layer, f)) for layer in runner.weights.layers for f in LINEAR_FIELDS}
    hessians: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def observe_linear(x, weight):
        if id(weight) not in wanted:
            return
        rows = x.reshape(-1, x.shape[-1]).double()
        h = hessians.setdefault(id(weight), torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64,
                                                             device=rows.device))
        h.addmm_(rows.t(), rows)
        counts[id(weight)] = counts.get(id(weight), 0) + rows.shape[0]

    ops = types.SimpleNamespace(**vars(reference_ops()), observe_linear=observe_linear)
    device = runner.device
    for chunk in token_windows(ids, window):
        tokens = torch.tensor([chunk], device=device)
        zero = torch.zeros(1, dtype=torch.int32, device=device)
        forward_logits(runner.weights, runner.config, runner.kv_cache, runner.rope, runner.embed(tokens), zero, zero,
                       torch.tensor([len(chunk)], dtype=torch.int32, device=device), kernels=ops)
    return {key: h * (2.0 / counts[key]) for key, h in hessians.items()}


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, *, group: int = GROUP_SIZE, damp: float = 0.01,
              dtype: torch.dtype | None = None) -> QuantizedWeight:
    """weight [N, K] quantized to formats.py's int4 layout with GPTQ's error compensation under H."""
    dtype = dtype or weight.dtype
    w = weight.float().clone()
    n, k = w.shape
    h = hessian.double().clone()  # H's spread is wide (outsized tokens): its inverse in float64
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(k, dtype=h.dtype, device=h.device) * damp * torch.mean(torch.diag(h))
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    groups = -(-k // group)
    scales = torch.zeros(n, groups, device=w.device)
    zeros = torch.zeros(n, groups, device=w.device)
    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column = start + i
            if column % group == 0:  # the group's parameters, from the compensated weights so far
                g = column // group
                span = torch.cat([block[:, i:], w[:, end:]], dim=1)[:, :min(group, k - column)]
                low, high = span.amin(dim=1).clamp(max=0), span.amax(dim=1).clamp(min=0)
                scales[:, g] = ((high - low) / 15.0).clamp(min=1e-8)
                zeros[:, g] = torch.round(-low / scales[:, g]).clamp(0, 15)
            g = column // group
            q = torch.clamp(torch.round(block[:, i] / scales[:, g] + zeros[:, g]), 0, 15)
            codes[:, column] = q.to(torch.uint8)
            error = (block[:, i] - (q - zeros[:, g]) * scales[:, g]) / h_inv[column, column]
            block[:, i:] -= error[:, None] * h_inv[column, column:end][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return QuantizedWeight("int4", pack_int4(codes), scales.to(dtype), zeros.to(dtype), k, group)


def quantize_engine(runner, ids: list[int], *, window: int = 512, group: int = GROUP_SIZE, progress=None) -> None:
    """Replace each layer linear weight of a full-precision engine by its GPTQ int4 version (H from
    `ids`); the engine's config then says int4."""
    import dataclasses

    from ..engine.weights import LINEAR_FIELDS

    hessians = calibrate(runner, ids, window=window)
    layers = runner.weights.layers
    for layer in (progress(layers, desc="GPTQ int4", unit="layer") if progress else layers):
        for field in LINEAR_FIELDS:
            weight = getattr(layer, field)
            setattr(layer, field, gptq_int4(weight, hessians[id(weight)], group=group, dtype=weight.dtype))
    runner.config = dataclasses.replace(runner.config, quantization="int4")
