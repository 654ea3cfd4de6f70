"""The host loop and request latency (issue 18, items 3 and 4), through LLMInferenceRuntime on
random-weight shapes with a synthetic byte-level tokenizer of the model's vocabulary size:

- decoding: 2000 generated tokens at batch 1, plain, with a stop string (one that never occurs, so
  it is searched every step), with a streaming callback, and both; each with the loop running one
  step ahead (the default) and reading every step first (EDGELLM_RUN_AHEAD=0); beside the GPU-only
  step (the decode graph replayed back to back), so that the host's share shows;
- TTFT: handle_request with max_generate_length=1 for prompts of 16..2032 tokens, and KV hits
  (1984 reused + 48 new) from the device tier and from the host tier against 48 tokens cold.

Run on a CUDA GPU:  python bench/host_loop.py --json bench/results/host_loop.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import edgellm.runtime as runtime_module  # noqa: E402
from edgellm import LLMGenerationRequest, LLMInferenceRuntime  # noqa: E402
from bench.common import write_synthetic_tokenizer  # noqa: E402
from edgellm.benchmark import SHAPES, log, random_model_dir  # noqa: E402
from edgellm.engine.kv_store import KVReuseSettings  # noqa: E402

NEVER = "<never occurs>"


def make_runtime(shape: str, cache_dir: str, *, max_new: int, kv_reuse: KVReuseSettings | None = None
                 ) -> LLMInferenceRuntime:
    model_dir = random_model_dir(shape, cache_dir)
    write_synthetic_tokenizer(model_dir, SHAPES[shape]["vocab_size"])
    runtime = LLMInferenceRuntime(model_dir, device="cuda", dtype="float16", max_batch_size=1,
                                  max_input_length=2048, max_kv_cache_capacity=2048 + max_new, kv_reuse=kv_reuse)
    runtime.eos_token_ids = frozenset()  # random weights: every row runs its full length
    return runtime


def gpu_step_us(runtime, steps: int) -> float:
    """Microseconds per decode step with no host work between steps: the graph replayed back to back."""
    runner = runtime.runner
    with torch.inference_mode():
        runner.start_decode([5], [0], [0.0], [0], [1.0], [0], [0])
        runner.decode_sample_step()
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(steps):
            runner.decode_sample_step()
        torch.cuda.synchronize()
        runner.end_decode()
    return (time.perf_counter() - began) / steps * 1e6


def decode_rows(runtime, new: int, iterations: int) -> list[dict]:
    prompt = [{"input_ids": list(range(10, 42))}]
    variants = {"plain": {}, "stop string": {"stop": [NEVER]}, "streaming": {"stream": True},
                "stop + streaming": {"stop": [NEVER], "stream": True}}
    rows = []
    for ahead in (True, False):
        runtime_module.RUN_AHEAD = ahead
        for name, variant in variants.items():
            request = LLMGenerationRequest(requests=prompt, max_generate_length=new, temperature=0.0,
                                           stop=variant.get("stop"))
            pieces = []
            on_text = (lambda i, delta: pieces.append(delta)) if variant.get("stream") else None
            runtime.handle_request(request, on_text=on_text)  # warm-up
            times = []
            for _ in range(iterations):
                response = runtime.handle_request(request, on_text=on_text)
                assert len(response.output_ids[0]) == new
                times.append(response.timings.decode_ms / response.timings.decode_tokens)
            ms = statistics.median(times)
            rows.append(dict(loop="one step ahead" if ahead else "step by step", variant=name,
                             us_per_token=ms * 1e3, tokens_per_s=1e3 / ms))
            log(f"  {rows[-1]['loop']:15s} {name:17s} {1e3 / ms:8.0f} tok/s")
    runtime_module.RUN_AHEAD = True
    return rows


def ttft_rows(shape: str, cache_dir: str, iterations: int) -> list[dict]:
    """Cold prompts on a runtime without KV reuse; then, on runtimes that keep saved blocks on the
    device, and on the host only: 48 new tokens (a miss) and a 1984-token saved prefix + 48 new tokens."""
    generator = torch.Generator().manual_seed(3)
    vocab = SHAPES[shape]["vocab_size"]
    rows = []

    def ttft(runtime, ids: list[int]) -> float:
        request = LLMGenerationRequest(requests=[{"input_ids": ids}], max_generate_length=1, temperature=0.0)
        torch.cuda.synchronize()
        began = time.perf_counter()
        runtime.handle_request(request)
        return (time.perf_counter() - began) * 1e3

    def fresh(length: int) -> list[int]:
        return torch.randint(10, vocab, (length,), generator=generator).tolist()

    runtime = make_runtime(shape, cache_dir, max_new=1)
    for length in (16, 48, 128, 512, 2032):
        times = [ttft(runtime, fresh(length)) for _ in range(iterations + 2)][2:]  # warm-up: graphs captured
        rows.append(dict(case=f"cold {length}", ms=statistics.median(times)))
        log(f"  TTFT {rows[-1]['case']:24s} {rows[-1]['ms']:7.2f} ms")
    del runtime
    for tier, settings in (("device", KVReuseSettings(gpu_bytes=1 << 30)),
                           ("host", KVReuseSettings(gpu_bytes=0, host_bytes=1 << 30))):
        runtime = make_runtime(shape, cache_dir, max_new=1, kv_reuse=settings)
        # What KV reuse costs a prompt it cannot help: 48 new tokens (no whole block to save) on this runtime.
        misses = [ttft(runtime, fresh(48)) for _ in range(iterations + 2)][2:]
        rows.append(dict(case=f"{tier}-tier miss 48", ms=statistics.median(misses)))
        log(f"  TTFT {rows[-1]['case']:24s} {rows[-1]['ms']:7.2f} ms")
        prefix = fresh(1984)
        for _ in range(2):
            ttft(runtime, prefix + fresh(48))  # saves the prefix's blocks; warm-up of the hit's graphs
        hits = [ttft(runtime, prefix + fresh(48)) for _ in range(iterations)]
        rows.append(dict(case=f"{tier} hit 1984 + 48", ms=statistics.median(hits),
                         reused_tokens=runtime.kv_reuse_stats().reused_tokens))
        log(f"  TTFT {rows[-1]['case']:24s} {rows[-1]['ms']:7.2f} ms")
        del runtime
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES), help="decode rows' shape")
    parser.add_argument("--ttft-shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--new", type=int, default=2000, help="tokens generated per decode request")
    parser.add_argument("--iterations", type=int, default=3, help="decode requests per row (median)")
    parser.add_argument("--ttft-iterations", type=int, default=15,
                        help="requests per TTFT row (median): a KV hit's TTFT moved +-25%% between medians of 3")
    parser.add_argument("--skip", nargs="*", default=[], choices=["decode", "ttft"])
    parser.add_argument("--cache-dir", default="/tmp/edgellm-bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = dict(shape=args.shape, ttft_shape=args.ttft_shape, new=args.new, device=torch.cuda.get_device_name())
    if "decode" not in args.skip:
        log(f"host loop, {args.shape}, batch 1, {args.new} tokens")
        runtime = make_runtime(args.shape, args.cache_dir, max_new=args.new)
        result["gpu_step_us"] = gpu_step_us(runtime, args.new)
        result["decode"] = decode_rows(runtime, args.new, args.iterations)
        del runtime
        torch.cuda.empty_cache()
    if "ttft" not in args.skip:
        log(f"TTFT, {args.ttft_shape}, batch 1")
        result["ttft"] = ttft_rows(args.ttft_shape, args.cache_dir, args.ttft_iterations)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if "decode" in result:
        step = result["gpu_step_us"]
        plain = {r["loop"]: r["tokens_per_s"] for r in result["decode"] if r["variant"] == "plain"}
        print(f"host loop {args.shape} b1 {args.new} tokens: GPU-only step {step:.1f} us ({1e6 / step:.0f} tok/s)")
        print(f"{'loop':15s} {'variant':17s} {'tok/s':>8s} {'x plain':>8s} {'host %':>7s}")
        for r in result["decode"]:
            print(f"{r['loop']:15s} {r['variant']:17s} {r['tokens_per_s']:8.0f} "
                  f"{r['tokens_per_s'] / plain[r['loop']]:8.3f} {100 * (r['us_per_token'] / step - 1):6.1f}%")
    if "ttft" in result:
        ms = {r["case"]: r["ms"] for r in result["ttft"]}
        print(f"TTFT {args.ttft_shape} b1 (handle_request, max_generate_length=1): "
              + "  ".join(f"{case}: {value:.2f} ms" for case, value in ms.items()))
        print(f"KV hits against cold 48: device {ms['device hit 1984 + 48'] / ms['cold 48']:.2f}x, "
              f"host {ms['host hit 1984 + 48'] / ms['cold 48']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
