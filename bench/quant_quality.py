"""Quantization quality on the default model (issue 17; CPU is enough): perplexity over
tests/data/eval_prose.txt for float32, round-to-nearest int8 / fp8 / int4 (groups 128, 64, 32), GPTQ
int4 variants (calibrated on edgellm/quant/calibration_prose.txt, the text `edgellm quantize` ships), the quantizer edgellm uses
(edgellm/quant/gptq.py quantize_layer_weight) and an AWQ-style per-input-channel scale search, each
against float32.

Run:  python bench/quant_quality.py --json bench/results/quant-quality.json   (about 35 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import edgellm  # noqa: E402
from edgellm.engine.model import forward_logits  # noqa: E402
from edgellm.engine.runner import LLMEngineRunner  # noqa: E402
from edgellm.engine.weights import LINEAR_FIELDS  # noqa: E402
from edgellm.kernels.ops import reference_ops  # noqa: E402
from edgellm.quant import dequantize, gptq, quantize  # noqa: E402
from edgellm.quant.formats import (GROUP_SIZE, QuantizedWeight, _pad_groups, int4_codes,  # noqa: E402
                                   pack_int4)
from edgellm.quant.quality import perplexity, token_windows  # noqa: E402

FIRST_CALIBRATION_TOKENS = 1300  # the calibration text's length before its second part was added


def activation_means(runner, ids) -> dict[int, torch.Tensor]:
    """mean |x| per input channel of each layer linear weight over `ids` (AWQ's salience)."""
    sums, counts = {}, {}
    wanted = {id(getattr(layer, f)) for layer in runner.weights.layers for f in LINEAR_FIELDS}

    def observe(x, weight):
        if id(weight) in wanted:
            rows = x.reshape(-1, x.shape[-1]).float()
            sums[id(weight)] = sums.get(id(weight), 0) + rows.abs().sum(0)
            counts[id(weight)] = counts.get(id(weight), 0) + rows.shape[0]

    ops = types.SimpleNamespace(**vars(reference_ops()), observe_linear=observe)
    with torch.inference_mode():
        for chunk in token_windows(ids, 512):
            tokens, zero = torch.tensor([chunk]), torch.zeros(1, dtype=torch.int32)
            forward_logits(runner.weights, runner.config, runner.kv_cache, runner.rope, runner.embed(tokens), zero, zero,
                           torch.tensor([len(chunk)], dtype=torch.int32), kernels=ops)
    return {key: sums[key] / counts[key] for key in sums}


def awq_style(weight, hessian, salience, grid=20):
    """The effective weight of the scale search: W * s quantized, / s, for the s = salience ** alpha
    (alpha on a grid over 0..1) with the least error under H."""
    best, best_error = None, float("inf")
    for step in range(grid + 1):
        s = salience.clamp(min=1e-5) ** (step / grid)
        s = s / (s.max() * s.min()).sqrt()
        effective = dequantize(quantize(weight * s[None, :], "int4"), torch.float32) / s[None, :]
        delta = effective - weight
        error = float(((delta @ hessian.float()) * delta).sum())
        if error < best_error:
            best, best_error = effective, error
    return best


def searched_rounding(weight, hessian):
    """Round to nearest with gptq.searched_groups' scales and zeros (the range search alone)."""
    scales, zeros = gptq.searched_groups(weight, hessian)
    codes = int4_codes(_pad_groups(weight.float(), GROUP_SIZE), scales, zeros).reshape(weight.shape[0], -1)
    return QuantizedWeight("int4", pack_int4(codes[:, :weight.shape[1]].to(torch.uint8)), scales, zeros,
                           weight.shape[1], GROUP_SIZE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from tokenizers import Tokenizer

    model_dir = edgellm.default_model_dir()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    evaluation = tokenizer.encode((ROOT / "tests/data/eval_prose.txt").read_text()).ids
    calibration = tokenizer.encode(gptq.CALIBRATION_TEXT.read_text()).ids
    runner = LLMEngineRunner(model_dir, device="cpu", dtype="float32", cuda_graphs=False, max_batch_size=16,
                             max_input_length=512, max_kv_cache_capacity=600)
    ops = reference_ops()
    original = [{f: getattr(layer, f) for f in LINEAR_FIELDS} for layer in runner.weights.layers]
    rows = []

    def measure(label, choose):
        for layer, weights in zip(runner.weights.layers, original):
            for field in LINEAR_FIELDS:
                setattr(layer, field, choose(field, weights[field]))
        value = perplexity(runner, evaluation, kernels=ops)
        rows.append(dict(weights=label, perplexity=value))
        print(f"{label:45s} {value:8.3f} {100 * (value / rows[0]['perplexity'] - 1):+8.2f}%", flush=True)

    measure("float32", lambda f, w: w)
    for kind in ("int8", "fp8"):
        measure(f"{kind} per channel (RTN)", lambda f, w, kind=kind: quantize(w, kind))
    for group in (128, 64, 32):
        measure(f"int4 g{group} (RTN)", lambda f, w, group=group: quantize(w, "int4", group=group))
    def restore():  # the full-precision weights back in place (measure leaves its own in)
        for layer, weights in zip(runner.weights.layers, original):
            for field in LINEAR_FIELDS:
                setattr(layer, field, weights[field])

    def calibrate(ids):
        restore()
        return gptq.calibrate(runner, ids)

    hessians = calibrate(calibration)
    split = runner.config.q_size + runner.config.kv_size

    def gptq_rows(f, w, value="gptq", act_order=True, damp=0.1):
        """GPTQ of every projection; the value rows (of qkv) too, or rounded to nearest."""
        h = hessians[id(w)]
        if f != "qkv" or value == "gptq":
            return gptq.gptq_int4(w, h, act_order=act_order, damp=damp)
        return gptq.stack_rows([gptq.gptq_int4(w[:split], h, act_order=act_order, damp=damp),
                                quantize(w[split:], "int4")])

    measure("int4 g128 searched group ranges, rounded (no GPTQ)", lambda f, w: searched_rounding(w, hessians[id(w)]))
    measure("int4 g128 GPTQ, column order, damp 0.01 (first session)",
            lambda f, w: gptq_rows(f, w, act_order=False, damp=0.01))
    measure("int4 g128 GPTQ, column order, value rows rounded", lambda f, w: gptq_rows(f, w, "rtn", act_order=False))
    measure("int4 g128 GPTQ, act order, searched groups, every row", lambda f, w: gptq_rows(f, w))
    measure("int4 g128 edgellm quantize --method gptq (act order, value rows rounded)",
            lambda f, w: gptq.quantize_layer_weight(f, w, hessians[id(w)], runner.config))
    short = calibrate(calibration[:FIRST_CALIBRATION_TOKENS])
    measure(f"int4 g128 edgellm's method calibrated on the first {FIRST_CALIBRATION_TOKENS} tokens",
            lambda f, w: gptq.quantize_layer_weight(f, w, short[id(w)], runner.config))
    restore()
    salience = activation_means(runner, calibration)
    measure("int4 g128 AWQ-style scale search", lambda f, w: awq_style(w, hessians[id(w)], salience[id(w)]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
