"""TTFT with saved KV prefixes (issue 6): a 2000-token system prompt + a 32-token question on the
Llama-3.2-1B shape (random fp16 weights), cold (no reuse) against a hit in each tier of the KV store:
device memory, pinned host RAM, a disk directory (files in the page cache, and evicted from it).

TTFT = wall time of handle_request with max_generate_length=1 (restore, prefill of the rest, first
token), median over the questions (the first of them is shown too: a process's first hits pay for
allocations); every hit's first token is compared with the cold run's.

Run on a CUDA GPU:  python bench/kv_reuse.py [--json bench/results/kv_reuse.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm import KVReuseSettings, LLMGenerationRequest, LLMInferenceRuntime, benchmark  # noqa: E402


def ttft(runtime, prompt: list[int]):
    torch.cuda.synchronize()
    start = time.perf_counter()
    response = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": prompt}], max_generate_length=1,
                                                           temperature=0))
    return (time.perf_counter() - start) * 1e3, response


def evict_page_cache(directory: Path) -> None:
    """Ask the kernel to drop the store's files from the page cache (so the next read hits the disk)."""
    for file in directory.glob("*.kvb"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--system-tokens", type=int, default=2000)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=5, help="questions per case (median)")
    parser.add_argument("--cache-dir", default="/tmp/edgellm-bench")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model_dir = benchmark.random_model_dir(args.shape, args.cache_dir)
    g = torch.Generator().manual_seed(0)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    tokens = lambda n: torch.randint(10, vocab, (n,), generator=g).tolist()  # noqa: E731
    system, warm_system = tokens(args.system_tokens), tokens(args.system_tokens)
    questions = [tokens(args.question_tokens) for _ in range(args.iterations + 2)]
    length = args.system_tokens + args.question_tokens
    engine = dict(device="cuda", dtype="float16", max_batch_size=1, max_input_length=length,
                  max_kv_cache_capacity=length + 64)
    disk_dir = Path(tempfile.mkdtemp(prefix="edgellm-kv-bench-"))
    configs = {
        "cold (no reuse)": None,
        "gpu tier hit": KVReuseSettings(gpu_bytes=1 << 30),
        "host tier hit": KVReuseSettings(gpu_bytes=0, host_bytes=1 << 30),
        "disk hit, page cache": KVReuseSettings(gpu_bytes=0, disk_dir=disk_dir / "a"),
        "disk hit, evicted": KVReuseSettings(gpu_bytes=0, disk_dir=disk_dir / "b"),
    }
    rows, cold_first = {}, {}
    for label, settings in configs.items():
        runtime = LLMInferenceRuntime(model_dir, kv_reuse=settings, **engine)
        for q in questions[:2]:  # warm-up: compile, capture graphs (both prefill lengths when reusing)
            ttft(runtime, warm_system + q)
        stored_ms, _ = ttft(runtime, system + questions[0])  # saves the prompt's blocks (cold + save)
        runtime.close()
        times, same, stats = [], 0, []
        for q in questions[2:]:
            if label == "disk hit, evicted":
                evict_page_cache(settings.disk_dir)
            ms, response = ttft(runtime, system + q)
            times.append(ms)
            if settings is None:
                cold_first[tuple(q)] = response.output_ids[0]
            else:
                same += response.output_ids[0] == cold_first[tuple(q)]
                stats.append(response.kv_reuse.as_dict())
        rows[label] = dict(ttft_ms=statistics.median(times), times_ms=times, first_request_ms=stored_ms,
                           same_first_token=None if settings is None else same, hits=stats[-1] if stats else None)
        benchmark.log(f"  {label}: {rows[label]['ttft_ms']:.2f} ms")
        del runtime
        torch.cuda.empty_cache()
    cold = rows["cold (no reuse)"]["ttft_ms"]
    kv_mb = benchmark_kv_mb(model_dir, args.system_tokens)
    meta = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(), torch=torch.__version__,
                commit=os.environ.get("EDGELLM_COMMIT", "unknown"), shape=args.shape,
                system_tokens=args.system_tokens, question_tokens=args.question_tokens, iterations=args.iterations,
                reused_kv_mb=kv_mb)
    print(f"\n{meta['device']}  torch {meta['torch']}  {args.shape}  system prompt {args.system_tokens} + question "
          f"{args.question_tokens} tokens  commit {meta['commit']}")
    print(f"{'case':<22s} {'TTFT ms':>9s} {'x cold':>7s} {'1st of 5':>9s} {'restore ms':>10s} {'reused tok':>10s} "
          f"{'hits g/h/d':>11s} {'same 1st':>9s}")
    for label, row in rows.items():
        hits = row["hits"]
        reused = hits["reused_tokens"] if hits else 0
        tiers = f"{hits['hits_gpu']}/{hits['hits_host']}/{hits['hits_disk']}" if hits else "-"
        same = f"{row['same_first_token']}/{args.iterations}" if row["same_first_token"] is not None else "-"
        restore = f"{hits['restore_ms']:10.2f}" if hits else f"{'-':>10s}"
        print(f"{label:<22s} {row['ttft_ms']:9.2f} {cold / row['ttft_ms']:6.1f}x {row['times_ms'][0]:9.2f} {restore} "
              f"{reused:10d} {tiers:>11s} {same:>9s}")
    print(f"(the reused prefix is {kv_mb:.0f} MB of KV; 'first request' times, which save the blocks, are in the JSON)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(meta=meta, cases=rows), indent=1))
    return 0


def benchmark_kv_mb(model_dir: Path, tokens: int) -> float:
    cfg = json.loads((model_dir / "config.json").read_text())
    heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * heads * head_dim * 2 * tokens / 1e6


if __name__ == "__main__":
    sys.exit(main())
