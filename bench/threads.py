"""Several threads on one runtime: the same requests one by one and from 8 threads at once. The
threads' requests share the running batch (continuous batching, edgellm/serving/), so the threaded run
should take a fraction of the sequential one's time; what waiting costs shows as each request's
timings.queue_ms. Answers: how many equal the one-by-one answers (all, where the kernels compute each
row as they do alone; on the GPU in float16 not yet: the batch-invariance issue).

Run on a CUDA GPU:  python bench/threads.py [--max-batch 8] --json bench/results/threads.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm import LLMGenerationRequest, LLMInferenceRuntime  # noqa: E402
from edgellm.benchmark import random_model_dir  # noqa: E402
from edgellm.fifo_lock import FifoLock  # noqa: E402


def requests(count: int, prompt_len: int, new: int, vocab: int) -> list[LLMGenerationRequest]:
    generator = torch.Generator().manual_seed(0)
    return [LLMGenerationRequest(requests=[{"input_ids": torch.randint(3, vocab, (prompt_len,), generator=generator).tolist()}],
                                 max_generate_length=new, temperature=0.0) for _ in range(count)]


def threaded(runtime, jobs: list[LLMGenerationRequest], threads: int):
    """Responses (in job order) and wall seconds, each thread running its share of the jobs."""
    responses = [None] * len(jobs)
    start = threading.Barrier(threads)

    def worker(t):
        start.wait()
        for i in range(t, len(jobs), threads):
            responses[i] = runtime.handle_request(jobs[i])

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    began = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return responses, time.perf_counter() - began


def lock_cost_us(lock, rounds: int = 100_000) -> float:
    began = time.perf_counter()
    for _ in range(rounds):
        with lock:
            pass
    return (time.perf_counter() - began) / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--per-thread", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8, help="the runtime's max_batch_size (1: turns)")
    parser.add_argument("--cache-dir", default=os.environ.get("EDGELLM_BENCH_CACHE", "/tmp/edgellm-bench"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model_dir = random_model_dir(args.shape, args.cache_dir)
    runtime = LLMInferenceRuntime(model_dir, device="cuda", max_batch_size=args.max_batch)
    runtime.capture_graphs()
    runtime.eos_token_ids = frozenset()  # random weights: every request decodes all its tokens
    jobs = requests(args.threads * args.per_thread, args.prompt_len, args.new, runtime.config.vocab_size)
    for job in jobs[:3]:
        runtime.handle_request(job)  # graphs captured, kernels compiled
    began = time.perf_counter()
    alone = [runtime.handle_request(job) for job in jobs]
    sequential_s = time.perf_counter() - began
    together, threaded_s = threaded(runtime, jobs, args.threads)
    same = sum(a.output_ids == b.output_ids for a, b in zip(alone, together))
    queue = [r.timings.queue_ms for r in together]
    tokens = sum(len(r.output_ids[0]) for r in together)
    rows = [dict(mode="one by one", wall_s=sequential_s, tokens_per_s=tokens / sequential_s,
                 mean_total_ms=statistics.mean(r.timings.total_ms for r in alone), mean_queue_ms=0.0, max_queue_ms=0.0),
            dict(mode=f"{args.threads} threads", wall_s=threaded_s, tokens_per_s=tokens / threaded_s,
                 mean_total_ms=statistics.mean(r.timings.total_ms for r in together),
                 mean_queue_ms=statistics.mean(queue), max_queue_ms=max(queue))]
    locks = dict(fifo_lock_us=lock_cost_us(FifoLock()), threading_lock_us=lock_cost_us(threading.Lock()))
    print(f"\n{args.shape}, {len(jobs)} requests of {args.prompt_len} prompt + {args.new} new tokens, max batch "
          f"{args.max_batch}, graphs on; answers identical to one by one: {same}/{len(jobs)}")
    print(f"{'mode':>12} {'wall s':>8} {'tok/s':>8} {'mean total ms':>14} {'mean queue ms':>14} {'max queue ms':>13}")
    for r in rows:
        print(f"{r['mode']:>12} {r['wall_s']:8.3f} {r['tokens_per_s']:8.0f} {r['mean_total_ms']:14.2f} "
              f"{r['mean_queue_ms']:14.2f} {r['max_queue_ms']:13.2f}")
    print(f"uncontended lock round trip: FifoLock {locks['fifo_lock_us']:.2f} us, "
          f"threading.Lock {locks['threading_lock_us']:.2f} us")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
            commit=os.environ.get("EDGELLM_COMMIT", "unknown"), torch=torch.__version__, shape=args.shape,
            max_batch=args.max_batch, requests=len(jobs), identical=same, rows=rows, **locks), indent=1))


if __name__ == "__main__":
    main()
