"""Where a decode step's time goes: GPU time per kernel (torch.profiler over eager decode steps,
whose kernels are those a graph replays) against the replayed step's wall time.

Run on a CUDA GPU:  python bench/profile_decode.py --shape llama-3.2-1b --batch 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm import benchmark  # noqa: E402
from edgellm.engine.runner import LLMEngineRunner  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--lora-rank", type=int, default=0, help="every row on a random adapter of this rank")
    args = parser.parse_args()
    model_dir = benchmark.random_model_dir(args.shape, "/tmp/edgellm-bench")
    adapters = {"r": benchmark.random_lora_dir(model_dir, f"/tmp/edgellm-bench/lora-profile-{args.shape}",
                                               rank=args.lora_rank, alpha=2.0 * args.lora_rank)} if args.lora_rank else None
    runner = LLMEngineRunner(model_dir, device="cuda", dtype="float16", max_batch_size=max(args.batch, 1),
                             max_kv_cache_capacity=args.capacity, lora_weights=adapters)
    b = args.batch
    lora = ["r" if adapters else ""] * b
    first = benchmark.prefill(runner, torch.randint(10, 1000, (b, 128), device="cuda"), lora)
    runner.start_decode(first, list(range(b)), [0.0] * b, [1] * b, [1.0] * b, [0] * b, [0] * b, lora=lora)
    for _ in range(5):
        runner.decode_sample_step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        runner.decode_sample_step()
    torch.cuda.synchronize()
    graph_ms = (time.perf_counter() - t0) / args.steps * 1e3
    steps = runner._decode  # the decode steps (engine/decode_steps.py): their body, eager
    buf = steps.running("profile")
    with torch.inference_mode():  # (the runner's buffers are inference tensors)
        for _ in range(3):
            steps.step_body(buf, buf.uses_lora)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                steps.step_body(buf, buf.uses_lora)
            torch.cuda.synchronize()
    events = prof.key_averages()
    total_us = sum(e.device_time_total for e in events) / args.steps
    launches = sum(e.count for e in events) / args.steps
    print(f"{args.shape} batch {b}{' LoRA rank %d' % args.lora_rank if adapters else ''}: graph step {graph_ms:.3f} ms; eager kernels' GPU time {total_us / 1e3:.3f} ms "
          f"in {launches:.0f} kernels per step")
    rows = sorted(events, key=lambda e: -e.device_time_total)[:14]
    for e in rows:
        print(f"  {e.device_time_total / args.steps:8.1f} us/step  {e.count / args.steps:5.0f}x  "
              f"{e.device_time_total / max(e.count, 1):6.1f} us each  {e.key[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
