"""The persistent decode step on the real default model (SmolLM2-135M-Instruct) against the chain:
greedy answers to 6 chat prompts x 48 tokens compared token by token, then batch-1 decode tokens/s of
each mode (256 tokens, end-of-sequence ignored, median of 3), in one run.

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
    for mode in ("chain", "persistent"):
        os.environ["EDGELLM_DECODE"] = mode
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
        out[mode] = dict(answers=answers, tokens_per_s=statistics.median(rates))
        log(f"{mode}: {out[mode]['tokens_per_s']:.0f} tok/s")
        del runtime
        torch.cuda.empty_cache()
    same = [a == b for a, b in zip(out["chain"]["answers"], out["persistent"]["answers"])]
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                  for a, b in zip(out["chain"]["answers"], out["persistent"]["answers"])]
    result = dict(device=torch.cuda.get_device_name(), commit=os.environ.get("EDGELLM_COMMIT", "unknown"),
                  identical=same, first_difference=first_diff, **{m: out[m] for m in out})
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"\n{result['device']}  commit {result['commit']}  default model, batch 1")
    print(f"greedy answers identical (6 prompts x {args.tokens} tokens): {sum(same)}/6  first differing token: {first_diff}")
    print(f"decode tok/s: chain {out['chain']['tokens_per_s']:.0f}  persistent {out['persistent']['tokens_per_s']:.0f}  "
          f"({out['persistent']['tokens_per_s'] / out['chain']['tokens_per_s']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
