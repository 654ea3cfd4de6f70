"""Serving under load (continuous batching, edgellm/serving/): closed-loop clients, each sending its next
request as soon as the last one finished, against the same requests served one at a time (the
serialized path every request took before the engine loop: here a lock held across each request), and
the runner's static batch of the same size decoding in the same run.

Requests: prompts of 128-1024 random tokens, 64-256 new tokens each (greedy, no stop ids: each runs its
full length), drawn with a fixed seed. Per client count: aggregate output tokens/s, TTFT p50/p99
(submit -> the first token on the host) and inter-token latency p50/p99 (between a row's tokens).

Run on a CUDA GPU:  python bench/serving.py [--shape llama-3.2-1b] [--clients 1 4 16 64] [--requests 64]
                    [--json bench/results/serving.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/ (bench/kernels.py)

from edgellm import LLMGenerationRequest, LLMInferenceRuntime  # noqa: E402
from edgellm.benchmark import bench_decode, copy_bandwidth, random_model_dir  # noqa: E402


def workload(count: int, vocab: int, seed: int = 0) -> list[LLMGenerationRequest]:
    rng = random.Random(seed)
    return [LLMGenerationRequest(requests=[{"input_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(128, 1024))]}],
                                 max_generate_length=rng.randint(64, 256), temperature=0.0) for _ in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def closed_loop(runtime, jobs: list[LLMGenerationRequest], clients: int, serialized: bool) -> dict:
    """Each of `clients` threads takes the next job when its last one is done; serialized: one request on
    the engine at a time (a lock around each). Tokens/s over the wall time, TTFT and ITL percentiles."""
    lock = threading.Lock()
    queue = list(reversed(jobs))
    ttft, itl, tokens, errors = [], [], [0], []

    def client():
        while True:
            with lock_jobs:
                if not queue:
                    return
                job = queue.pop()
            try:
                if serialized:
                    lock.acquire()
                handle = runtime.submit(job)
                response = handle.result()
                times = handle.sequences[0].token_times  # when each token reached the row (engine loop)
                with lock_jobs:
                    tokens[0] += sum(len(ids) for ids in response.output_ids)
                    ttft.append((times[0] - handle.submitted) * 1e3)
                    itl.extend((b - a) * 1e3 for a, b in zip(times, times[1:]))
            except Exception as exc:  # noqa: BLE001 - reported in the result
                errors.append(repr(exc))
            finally:
                if serialized:
                    lock.release()

    lock_jobs = threading.Lock()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    return dict(clients=clients, serialized=serialized, requests=len(jobs), wall_s=wall, tokens=tokens[0],
                tokens_per_s=tokens[0] / wall, ttft_p50_ms=percentile(ttft, 0.5), ttft_p99_ms=percentile(ttft, 0.99),
                itl_p50_ms=percentile(itl, 0.5), itl_p99_ms=percentile(itl, 0.99), errors=errors[:5])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=64, help="requests per client count")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--prefill-budget", type=int, default=None, help="runtime's prefill_budget (default 512)")
    parser.add_argument("--cache-dir", default="/tmp/edgellm-bench-models")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model_dir = random_model_dir(args.shape, args.cache_dir)
    runtime = LLMInferenceRuntime(model_dir, device="cuda", dtype="float16", max_batch_size=args.max_batch,
                                  max_input_length=1024, max_kv_cache_capacity=1024 + 256,
                                  prefill_budget=args.prefill_budget)
    vocab = runtime.config.vocab_size
    runtime.eos_token_ids = frozenset()  # every request runs its full length (submit reads them per request)
    closed_loop(runtime, workload(32, vocab, seed=99), 16, False)  # warm-up: graphs captured, kernels compiled
    rows = []
    for clients in args.clients:
        jobs = workload(args.requests, vocab, seed=clients)
        for serialized in ((False, True) if clients > 1 else (False,)):
            rows.append(closed_loop(runtime, jobs, clients, serialized))
            print(json.dumps(rows[-1]), file=sys.stderr)
    with runtime.exclusive() as runner:
        static = bench_decode(runner, args.max_batch, 512, 128, 3, copy_bandwidth())
    print(f"serving  {args.shape}  prefill budget {runtime._loop.prefill_budget}  static batch {args.max_batch}: "
          f"{static['tokens_per_s']:.0f} tok/s")
    print("clients path        tok/s   TTFT p50/p99 ms   ITL p50/p99 ms  errors")
    for row in rows:
        print(f"{row['clients']:7d} {'serialized' if row['serialized'] else 'loop':10s} {row['tokens_per_s']:7.0f} "
              f"{row['ttft_p50_ms']:8.1f}/{row['ttft_p99_ms']:<8.1f} {row['itl_p50_ms']:7.2f}/{row['itl_p99_ms']:<7.2f} "
              f"{len(row['errors'])}")
    if args.json:
        args.json.write_text(json.dumps(dict(shape=args.shape, prefill_budget=runtime._loop.prefill_budget,
                                             static=static, rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
