"""The decode modes on the real default model (SmolLM2-135M-Instruct): the chain with its fused GEMVs
(the default), the chain of separate ops (EDGELLM_FUSED_GEMV=0) and the persistent step: greedy
answers to 6 chat prompts x 48 tokens compared token by token with the unfused chain's, then batch-1
decode tokens/s of each mode (256 tokens, end-of-sequence ignored, median of 3), in one run.

Run on a CUDA GPU with the default model available:  python bench/persistent_real.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm import LLMGenerationRequest, LLMInferenceRuntime, default_model_dir  # noqa: E402
from edgellm.benchmark import log  # noqa: E402

PROMPTS = ["Write a short story about a fox who learns to sail.", "Explain why the sky is blue to a ten-year-old.",
           "Give me some ideas for a rainy weekend.", "What is the capital of France, and why is it famous?",
           "List three uses of a paperclip.", "Summarise the plot of Romeo and Juliet in two sentences."]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--speed-tokens", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model = default_model_dir()
    out = {}
    modes = {"chain": ("chain", "1"), "unfused": ("chain", "0"), "persistent": ("persistent", "1")}
    for name, (mode, fused) in modes.items():
        os.environ["EDGELLM_DECODE"], os.environ["EDGELLM_FUSED_GEMV"] = mode, fused
        runtime = LLMInferenceRuntime(model, device="cuda")
        assert (runtime.runner.persistent is not None) == (mode == "persistent")
        answers = [runtime.handle_request(LLMGenerationRequest(requests=[{"messages": [{"role": "user", "content": p}]}],
                                                               max_generate_length=args.tokens, temperature=0.0))
                   .output_ids[0] for p in PROMPTS]
        runtime.eos_token_ids = frozenset()  # the speed run decodes all its tokens
        speed = LLMGenerationRequest(requests=[{"messages": [{"role": "user", "content": PROMPTS[0]}]}],
                                     max_generate_length=args.speed_tokens, temperature=0.0)
        runtime.handle_request(speed)
        rates = [runtime.handle_request(speed).timings.decode_tokens_per_s for _ in range(3)]
        out[name] = dict(answers=answers, tokens_per_s=statistics.median(rates))
        log(f"{name}: {out[name]['tokens_per_s']:.0f} tok/s")
        del runtime
        torch.cuda.empty_cache()
    reference = out["unfused"]["answers"]
    result = dict(device=torch.cuda.get_device_name(), commit=os.environ.get("EDGELLM_COMMIT", "unknown"), **out)
    for name in ("chain", "persistent"):
        result[name]["identical_to_unfused"] = [a == b for a, b in zip(out[name]["answers"], reference)]
        result[name]["first_difference"] = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                                            for a, b in zip(out[name]["answers"], reference)]
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"\n{result['device']}  commit {result['commit']}  default model, batch 1")
    for name in ("chain", "persistent"):
        same = result[name]["identical_to_unfused"]
        print(f"{name}: greedy answers identical to the unfused chain's (6 prompts x {args.tokens} tokens): "
              f"{sum(same)}/6  first differing token: {result[name]['first_difference']}")
    base = out["unfused"]["tokens_per_s"]
    print("decode tok/s: " + "  ".join(f"{name} {out[name]['tokens_per_s']:.0f} ({out[name]['tokens_per_s'] / base:.2f}x)"
                                       for name in modes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
