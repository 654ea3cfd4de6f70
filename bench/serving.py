"""Serving under load (continuous batching, edgellm/serving/): closed-loop clients, each sending its next
request as soon as the last one finished, against the same requests served one at a time (the
serialized path every request took before the engine loop: here a lock held across each request), and
the runner's static batch of the same size decoding in the same run.

Requests: prompts of 128-1024 random tokens, 64-256 new tokens each (greedy, no stop ids: each runs its
full length), drawn with a fixed seed. Per client count: aggregate output tokens/s over the whole run and
over its steady part (while every client still has a request to send: the run's tail, where the last
requests finish with fewer rows beside them, left out), TTFT p50/p99 (submit -> the first token on the
host), inter-token latency p50/p99 (between a row's tokens), and the loop's steps by kind (mixed: a
decode step with a prompt chunk in its forward; prefill: a prefill step of its own).

Run on a CUDA GPU:  python bench/serving.py [--shape llama-3.2-1b] [--clients 1 4 16 64]
                    [--prefill-budget 512 [256 ...]] [--json bench/results/serving.json]
(budgets after the first, and --separate-prefill, add rows at 16 clients.)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import sys
import threading
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/ (bench/kernels.py)
sys.path.insert(1, str(Path(__file__).resolve().parent))  # (after it: bench/serving_http.py by name)

from edgellm import LLMGenerationRequest, LLMInferenceRuntime  # noqa: E402
from edgellm.benchmark import bench_decode, copy_bandwidth, random_model_dir  # noqa: E402
from serving_http import ensure_tokenizer, http_closed_loop, run_clients, start_server, stop_server  # noqa: E402


def workload(count: int, vocab: int, seed: int = 0) -> list[LLMGenerationRequest]:
    rng = random.Random(seed)
    return [LLMGenerationRequest(requests=[{"input_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(128, 1024))]}],
                                 max_generate_length=rng.randint(64, 256), temperature=0.0) for _ in range(count)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def closed_loop(runtime, jobs: list[LLMGenerationRequest], clients: int, serialized: bool, **tags) -> dict:
    """Each of `clients` threads takes the next job when its last one is done; serialized: one request on
    the engine at a time (a lock around each). Tokens/s over the wall time and over the steady part
    (until the last job is taken), TTFT and ITL percentiles, the loop's steps by kind."""
    lock = threading.Lock()
    queue = list(reversed(jobs))
    ttft, itl, times_all, errors = [], [], [], []
    last_taken = [None]

    def client():
        while True:
            with lock_jobs:
                if not queue:
                    return
                job = queue.pop()
                if not queue:
                    last_taken[0] = time.perf_counter()
            try:
                if serialized:
                    lock.acquire()
                handle = runtime.submit(job)
                handle.result()
                times = handle.sequences[0].token_times  # when each token reached the row (engine loop)
                with lock_jobs:
                    times_all.append(times)
                    ttft.append((times[0] - handle.submitted) * 1e3)
                    itl.extend((b - a) * 1e3 for a, b in zip(times, times[1:]))
            except Exception as exc:  # noqa: BLE001 - reported in the result
                errors.append(repr(exc))
            finally:
                if serialized:
                    lock.release()

    lock_jobs = threading.Lock()
    steps = dict(runtime._loop.step_counts)
    began, wall = run_clients(client, clients)
    tokens = sum(len(times) for times in times_all)
    steady_end = last_taken[0] or began + wall
    steady = sum(began <= t <= steady_end for times in times_all for t in times)
    steps = {kind: count - steps.get(kind, 0) for kind, count in runtime._loop.step_counts.items()}
    return dict(clients=clients, serialized=serialized, **tags, requests=len(jobs), wall_s=wall, tokens=tokens,
                tokens_per_s=tokens / wall, steady_tokens_per_s=steady / max(steady_end - began, 1e-9),
                ttft_p50_ms=percentile(ttft, 0.5), ttft_p99_ms=percentile(ttft, 0.99),
                ttft_mean_ms=sum(ttft) / max(len(ttft), 1),
                itl_p50_ms=percentile(itl, 0.5), itl_p99_ms=percentile(itl, 0.99), itl_max_ms=max(itl, default=0),
                steps=steps, errors=errors[:5])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests-per-client", type=int, default=8,
                        help="requests per client count: this many per client, at least 64")
    parser.add_argument("--serialized-requests", type=int, default=32, help="requests of the serialized rows")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--prefill-budget", type=int, nargs="+", default=[None],
                        help="runtime's prefill_budget (default 512); more values add rows at 16 clients")
    parser.add_argument("--separate-prefill", action="store_true",
                        help="add a 16-client row without mixed steps (prefill steps of their own)")
    parser.add_argument("--http", action="store_true",
                        help="also run the clients through `edgellm serve` (bench/serving_http.py) and compare")
    parser.add_argument("--cache-dir", default="/tmp/edgellm-bench-models")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model_dir = random_model_dir(args.shape, args.cache_dir)
    if args.http:
        ensure_tokenizer(model_dir, json.loads((model_dir / "config.json").read_text())["vocab_size"])
    runtime = LLMInferenceRuntime(model_dir, device="cuda", dtype="float16", max_batch_size=args.max_batch,
                                  max_input_length=1024, max_kv_cache_capacity=1024 + 256,
                                  prefill_budget=args.prefill_budget[0])
    loop, runner = runtime._loop, runtime.runner
    vocab = runtime.config.vocab_size
    runtime.eos_token_ids = frozenset()  # every request runs its full length (submit reads them per request)
    rows = []

    def run(clients, serialized=False, **tags):
        count = args.serialized_requests if serialized else max(64, args.requests_per_client * clients)
        rows.append(closed_loop(runtime, workload(count, vocab, seed=clients), clients, serialized,
                                budget=loop.prefill_budget, mixed=runner.takes_mixed_steps, **tags))
        print(json.dumps(rows[-1]), file=sys.stderr)

    for budget in args.prefill_budget:  # warm-up: graphs captured, kernels compiled
        loop.prefill_budget = budget or loop.prefill_budget
        began = time.perf_counter()
        graphs = runtime.capture_graphs()
        print(f"budget {loop.prefill_budget}: {graphs} graphs captured up front in {time.perf_counter() - began:.1f} s",
              file=sys.stderr)
        closed_loop(runtime, workload(48, vocab, seed=99), 16, False)
    captured = runner.graphs.capture_seconds
    gc.collect()
    gc.freeze()  # (as edgellm serve does once loaded: no full collection stalls a measured row)
    loop.prefill_budget = args.prefill_budget[0] or loop.prefill_budget
    for clients in args.clients:
        for serialized in ((False, True) if clients > 1 else (False,)):
            run(clients, serialized)
    for budget in args.prefill_budget[1:]:
        loop.prefill_budget = budget
        run(16)
    if args.separate_prefill:
        switches = runner.switches
        runner.switches = dataclasses.replace(switches, mixed_steps=False)
        closed_loop(runtime, workload(32, vocab, seed=98), 16, False)  # (its prefill graphs)
        run(16)
        runner.switches = switches
    print(f"graph captures during the measured runs: {runner.graphs.capture_seconds - captured:.2f} s", file=sys.stderr)
    with runtime.exclusive() as held:
        static = bench_decode(held, args.max_batch, 512, 128, 3, copy_bandwidth())
    print(f"serving  {args.shape}  static batch {args.max_batch}: {static['tokens_per_s']:.0f} tok/s")
    print("clients path        budget mixed   tok/s  steady  %static  TTFT p50/p99 ms   ITL p50/p99/max ms    "
          "steps mixed/decode/prefill  errors")
    for row in rows:
        steps = row["steps"]
        print(f"{row['clients']:7d} {'serialized' if row['serialized'] else 'loop':10s} {row['budget']:6d} "
              f"{'yes' if row['mixed'] else 'no':5s} {row['tokens_per_s']:7.0f} {row['steady_tokens_per_s']:7.0f} "
              f"{100 * row['steady_tokens_per_s'] / static['tokens_per_s']:7.1f}% "
              f"{row['ttft_p50_ms']:8.1f}/{row['ttft_p99_ms']:<8.1f} "
              f"{row['itl_p50_ms']:6.2f}/{row['itl_p99_ms']:<6.2f}/{row['itl_max_ms']:<7.2f} "
              f"{steps.get('mixed', 0):7d}/{steps.get('decode', 0)}/{steps.get('prefill', 0):<8d} {len(row['errors'])}")
    http_rows = run_http(args, model_dir, runtime, rows) if args.http else []
    if args.json:
        args.json.write_text(json.dumps(dict(shape=args.shape, static=static, rows=rows, http_rows=http_rows),
                                        indent=2) + "\n")


def run_http(args, model_dir, runtime, rows) -> list[dict]:
    """The loop rows' client counts again through `edgellm serve` (the same workloads), beside them:
    throughput as a share of the in-process row's, TTFT added at the median."""
    runtime.close()
    sys.setswitchinterval(2.5e-4)  # (the client threads share this interpreter: each takes its bytes promptly)
    process, port = start_server(model_dir, max_batch=args.max_batch, max_input=1024, capacity=1024 + 256,
                                 prefill_budget=args.prefill_budget[0])
    vocab = runtime.config.vocab_size
    try:
        warm = workload(48, vocab, seed=99)
        http_closed_loop(port, [_job(r) for r in warm], 16, percentile)
        http_rows = []
        for clients in args.clients:
            count = max(64, args.requests_per_client * clients)
            http_rows.append(http_closed_loop(port, [_job(r) for r in workload(count, vocab, seed=clients)], clients,
                                              percentile))
            print(json.dumps(http_rows[-1]), file=sys.stderr)
    finally:
        status = stop_server(process)
    print(f"edgellm serve exited with status {status}")
    print("clients  in-process tok/s  http tok/s  http/in-process  steady ratio  TTFT p50 in/http ms (added)  "
          "TTFT mean in/server/client ms  ITL p50/p99 http ms  chunks/token  errors")
    loop_rows = {row["clients"]: row for row in rows if not row["serialized"] and row["budget"] == rows[0]["budget"]
                 and row["mixed"] == rows[0]["mixed"]}
    for row in http_rows:
        base = loop_rows[row["clients"]]
        print(f"{row['clients']:7d} {base['tokens_per_s']:17.0f} {row['tokens_per_s']:11.0f} "
              f"{row['tokens_per_s'] / base['tokens_per_s']:15.3f} "
              f"{row['steady_tokens_per_s'] / max(base['steady_tokens_per_s'], 1e-9):13.3f}  "
              f"{base['ttft_p50_ms']:8.2f} / {row['ttft_p50_ms']:<8.2f} ({row['ttft_p50_ms'] - base['ttft_p50_ms']:+.2f})"
              f"  {base['ttft_mean_ms']:8.2f} / {row['server_ttft_mean_ms']:.2f} / {row['ttft_mean_ms']:<8.2f}"
              f"     {row['itl_p50_ms']:6.2f}/{row['itl_p99_ms']:<6.2f}       {row['chunks_per_token']:.3f}  "
              f"{len(row['errors'])}")
    return http_rows


def _job(request: LLMGenerationRequest) -> dict:
    return {"input_ids": request.requests[0]["input_ids"], "max_tokens": request.max_generate_length}


if __name__ == "__main__":
    main()
