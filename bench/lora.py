"""What per-row LoRA costs in decode: the Llama-3.2-1B shape (random fp16 weights), rank-16 adapters on
all seven projections, CUDA graphs on. Batch 1 with an adapter against batch 1 without; batch 16 with
4 different adapters (rows round-robin) against batch 16 all on one adapter (and against none).
Targets (issue 5): batch-1 slowdown <= 15%; 4 adapters vs 1 at batch 16 <= 10%.

Run on a CUDA GPU:  python bench/lora.py [--json bench/results/lora.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm import benchmark  # noqa: E402
from edgellm.engine.runner import LLMEngineRunner  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--cache-dir", default="/tmp/edgellm-bench")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model_dir = benchmark.random_model_dir(args.shape, args.cache_dir)
    names = [f"r{i}" for i in range(4)]
    adapters = {name: benchmark.random_lora_dir(model_dir, Path(args.cache_dir) / f"lora-{args.shape}-{name}",
                                                rank=args.rank, alpha=2.0 * args.rank, seed=i)
                for i, name in enumerate(names)}
    runner = LLMEngineRunner(model_dir, device="cuda", dtype="float16", max_batch_size=16,
                             max_input_length=args.isl, max_kv_cache_capacity=args.isl + args.osl,
                             lora_weights=adapters)
    bandwidth = benchmark.copy_bandwidth()
    cases = {
        "b1 base": (1, [""]), "b1 one adapter": (1, [names[0]]),
        "b16 base": (16, [""] * 16), "b16 one adapter": (16, [names[0]] * 16),
        "b16 four adapters": (16, [names[i % 4] for i in range(16)]),
    }
    rows = {}
    for label, (batch, lora) in cases.items():
        rows[label] = benchmark.bench_decode(runner, batch, args.isl, args.osl, args.iterations, bandwidth, lora=lora)
        benchmark.log(f"  {label}: {rows[label]['tokens_per_s']:.0f} tok/s, {rows[label]['ms_per_step']:.3f} ms/step")

    def slowdown(case, against):
        return rows[case]["ms_per_step"] / rows[against]["ms_per_step"] - 1

    checks = [("b1: adapter vs none", slowdown("b1 one adapter", "b1 base"), 0.15),
              ("b16: 4 adapters vs 1", slowdown("b16 four adapters", "b16 one adapter"), 0.10),
              ("b16: 1 adapter vs none", slowdown("b16 one adapter", "b16 base"), None)]
    name = torch.cuda.get_device_name()
    print(f"\n{name}  torch {torch.__version__}  {args.shape}  rank {args.rank} on q,k,v,o,gate,up,down  "
          f"ISL {args.isl} OSL {args.osl}")
    print(f"{'case':<20s} {'tok/s':>8s} {'ms/step':>8s}")
    for label, row in rows.items():
        print(f"{label:<20s} {row['tokens_per_s']:8.0f} {row['ms_per_step']:8.3f}")
    for label, value, target in checks:
        verdict = "" if target is None else ("  met" if value <= target else "  NOT met") + f" (target <= {target:.0%})"
        print(f"{label:<24s} {value:+6.1%}{verdict}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(device=name, torch=torch.__version__, shape=args.shape,
                                                   rank=args.rank, cases=rows,
                                                   slowdowns={label: value for label, value, _ in checks}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
