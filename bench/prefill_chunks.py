"""Time to first token against the prefill chunk size (issue 19: "chunked prefill chooses the chunk
that measures fastest"): for each chunk size an engine on a random-weight shape (batch 1), TTFT of
prompts of several lengths as `edgellm bench --ttft` measures it (prefill of the embeddings plus the
first sampled token, median of --iterations after a warm-up), beside the compute floor: the
projections (2 x the layers' weights x tokens, the LM head for one row) and causal attention
(2 x 2 x tokens^2 / 2 x head_dim x query heads a layer) at the GPU's measured fp16 matmul rate.

Run on a CUDA GPU:  python bench/prefill_chunks.py [--shape llama-3.2-1b] [--chunks 1024 2048 4096]
                    [--lengths 1024 2048 4096 8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernels import matmul_rate  # noqa: E402
from edgellm.benchmark import SHAPES, bench_ttft, log, random_model_dir  # noqa: E402
from edgellm.engine.runner import LLMEngineRunner  # noqa: E402


def floor_ms(runner, tokens: int, rate: float) -> float:
    """The prompt's matmuls and causal attention at `rate` FLOP/s."""
    cfg = runner.config
    layer_params = sum(t.numel() for lw in runner.weights.layers for t in (lw.qkv, lw.o_proj, lw.gate_up, lw.down))
    attention = len(runner.weights.layers) * 2 * tokens * tokens * cfg.head_dim * cfg.num_attention_heads
    return (2 * (layer_params * tokens + runner.weights.lm_head.numel()) + attention) / rate * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--cache-dir", default="/tmp/edgellm-bench")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model_dir = random_model_dir(args.shape, args.cache_dir)
    rate = matmul_rate()
    longest = max(args.lengths)
    table = {}
    for chunk in args.chunks:
        log(f"chunk {chunk}: loading {model_dir} ...")
        runner = LLMEngineRunner(model_dir, device="cuda", dtype="float16", max_batch_size=1,
                                 max_input_length=longest, max_kv_cache_capacity=longest, prefill_chunk_size=chunk)
        with torch.inference_mode():
            for length in args.lengths:
                ms = bench_ttft(runner, length, args.iterations)["ttft_ms"]
                floor = floor_ms(runner, length, rate)
                table[(chunk, length)] = (ms, floor)
                log(f"  chunk {chunk} prompt {length}: TTFT {ms:.2f} ms (compute floor {floor:.2f} ms)")
        del runner
        gc.collect()
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, {args.shape}, batch 1, fp16; TTFT ms (compute floor at "
          f"{rate / 1e12:.0f} TFLOP/s)")
    print("| chunk | " + " | ".join(str(n) for n in args.lengths) + " |")
    print("| --- |" + " --- |" * len(args.lengths))
    for chunk in args.chunks:
        print(f"| {chunk} | " + " | ".join(f"{table[(chunk, n)][0]:.2f}" for n in args.lengths) + " |")
    print("| floor | " + " | ".join(f"{table[(args.chunks[0], n)][1]:.2f}" for n in args.lengths) + " |")
    if args.json:
        rows = [dict(chunk=c, prompt_len=n, ttft_ms=ms, floor_ms=f) for (c, n), (ms, f) in table.items()]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), shape=args.shape,
                                                   matmul_tflops=rate / 1e12, results=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
