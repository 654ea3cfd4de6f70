"""Quantization quality on the default model (issue 17; CPU is enough): perplexity over
tests/data/eval_prose.txt for float32, round-to-nearest int8 / fp8 / int4 (groups 128, 64, 32), GPTQ
int4 (H from tests/data/calibration_prose.txt; per projection too) and an AWQ-style per-input-channel
scale search, each against float32. --self-samples adds the model's own sampled text to the
calibration tokens (GPTQ with more data).

Run:  python bench/quant_quality.py --json bench/results/quant-quality.json   (a few minutes on 2 cores)
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
from edgellm.quant.quality import perplexity, token_windows  # noqa: E402


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--self-samples", action="store_true")
    args = parser.parse_args()
    from tokenizers import Tokenizer

    model_dir = edgellm.default_model_dir()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    evaluation = tokenizer.encode((ROOT / "tests/data/eval_prose.txt").read_text()).ids
    calibration = tokenizer.encode((ROOT / "tests/data/calibration_prose.txt").read_text()).ids
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
    measure("float32 (restored)", lambda f, w: w)
    hessians = gptq.calibrate(runner, calibration)
    measure("int4 g128 GPTQ", lambda f, w: gptq.gptq_int4(w, hessians[id(w)]))
    for only in LINEAR_FIELDS:
        measure(f"RTN, GPTQ on {only} only",
                lambda f, w, only=only: gptq.gptq_int4(w, hessians[id(w)]) if f == only else quantize(w, "int4"))
    measure("float32 (restored)", lambda f, w: w)
    salience = activation_means(runner, calibration)
    measure("int4 g128 AWQ-style scale search", lambda f, w: awq_style(w, hessians[id(w)], salience[id(w)]))
    if args.self_samples:
        from edgellm import LLMGenerationRequest, LLMInferenceRuntime

        measure("float32 (restored)", lambda f, w: w)
        runtime = LLMInferenceRuntime(model_dir, device="cpu", dtype="float32", cuda_graphs=False, max_batch_size=16,
                                      max_input_length=512, max_kv_cache_capacity=600)
        starts = [calibration[i:i + 16] for i in range(0, 16 * 60, 60)]
        with edgellm.kernels.use_reference():
            out = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": s} for s in starts],
                                                              max_generate_length=400, temperature=1.0, top_p=0.95))
        ids = calibration + [t for s, o in zip(starts, out.output_ids) for t in s + o]
        more = gptq.calibrate(runner, ids)
        measure(f"int4 g128 GPTQ, {len(ids)} calibration tokens", lambda f, w: gptq.gptq_int4(w, more[id(w)]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
