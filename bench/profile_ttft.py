"""Where a short prompt's TTFT goes (issue 18, item 4): handle_request(max_generate_length=1) on a
random-weight shape, split into its host phases (perf_counter around the runtime's parts, the GPU
synchronised at each edge) and profiled with torch.profiler (the busiest host calls and GPU kernels).

Run on a CUDA GPU:  python bench/profile_ttft.py [--shape llama-3.2-1b] [--length 16] [--trace out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm import LLMGenerationRequest, LLMInferenceRuntime  # noqa: E402
from edgellm.benchmark import SHAPES, random_model_dir, timed as once_timed  # noqa: E402
from edgellm.engine.graphs import PrefillKey  # noqa: E402
from edgellm.engine.kv_store import KVReuseSettings  # noqa: E402
from edgellm.kernels import ops  # noqa: E402


def timed(fn, repeats: int = 20) -> float:
    """Median milliseconds of fn(), the GPU synchronised around each call."""
    return statistics.median(once_timed(fn)[0] for _ in range(repeats)) * 1e3


def timeline(fn, label: str, gaps: int = 6) -> None:
    """One call of fn under the profiler, as a timeline: when the first and last kernels ran relative
    to the call's start and end (the host time before the GPU starts and after it stops), the host
    calls on the way (top-level ops and CUDA API calls over 15 us), and the GPU's largest idle gaps."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.profiler.record_function("timeline_call"):
            fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = [e for e in json.load(open(f.name))["traceEvents"] if e.get("ph") == "X"]
    call = next(e for e in events if e["name"] == "timeline_call" and e.get("cat") == "user_annotation")
    t0, t1 = call["ts"], call["ts"] + call["dur"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    gpu = [e for e in gpu if t0 <= e["ts"] <= t1 + 50]
    busy = sum(e["dur"] for e in gpu)
    print(f"timeline {label}: call {t1 - t0:.0f} us; GPU from +{gpu[0]['ts'] - t0:.0f} to "
          f"+{gpu[-1]['ts'] + gpu[-1]['dur'] - t0:.0f} us ({len(gpu)} ops, {busy:.0f} us busy); "
          f"host after the GPU: {t1 - gpu[-1]['ts'] - gpu[-1]['dur']:.0f} us")
    host = sorted((e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime", "user_annotation")
                   and t0 <= e["ts"] <= t1 and e is not call and e["dur"] >= 15), key=lambda e: e["ts"])
    for e in host[:70]:
        print(f"  host +{e['ts'] - t0:7.0f} us {e['dur']:7.0f} us  {e['name'][:70]}")
    holes = sorted(((b["ts"] - a["ts"] - a["dur"], a["ts"] - t0, b["name"][:50]) for a, b in zip(gpu, gpu[1:])),
                   reverse=True)[:gaps]
    for hole, at, name in holes:
        print(f"  GPU idle {hole:6.1f} us at +{at:.0f} us before {name}")


def host_marks(runtime, request, repeats: int = 20) -> dict[str, tuple[float, float]]:
    """Where handle_request's host time goes, no profiler attached: each named step's entry and exit,
    median milliseconds after the call's start, over `repeats` calls (the GPU idle before each). The
    graph launch is the first CUDAGraph.replay; advance_rows runs once the first token is on the host."""
    import edgellm.runtime as runtime_module
    from edgellm.engine.kv_store import TieredKVStore
    from edgellm.engine.prefill_steps import PrefillSteps
    from edgellm.engine.runner import LLMEngineRunner
    steps = [(runtime_module.LLMInferenceRuntime, "_prepare"), (TieredKVStore, "keys"), (TieredKVStore, "restore"),
             (TieredKVStore, "take_pending"), (LLMEngineRunner, "prefill_tokens"),
             (PrefillSteps, "_prefill_chunk"), (torch.cuda.CUDAGraph, "replay"), (ops, "sample"),
             (TieredKVStore, "save"), (runtime_module, "advance_rows")]
    marks: dict[str, list[float]] = {}
    originals = {(owner, name): getattr(owner, name) for owner, name in steps}

    def wrapped(label, fn):
        def call(*a, **k):
            entered = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                marks.setdefault(label, [entered, time.perf_counter()])
        return call

    rows: dict[str, list[tuple[float, float]]] = {}
    for (owner, name), fn in originals.items():
        setattr(owner, name, wrapped(name, fn))
    try:
        for _ in range(repeats):
            marks.clear()
            torch.cuda.synchronize()
            began = time.perf_counter()
            runtime.handle_request(request)
            marks["handle_request"] = [began, time.perf_counter()]
            for label, (a, b) in marks.items():
                rows.setdefault(label, []).append(((a - began) * 1e3, (b - began) * 1e3))
    finally:
        for (owner, name), fn in originals.items():
            setattr(owner, name, fn)
    return {label: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v))
            for label, v in sorted(rows.items(), key=lambda kv: statistics.median(a for a, _ in kv[1]))}


def print_marks(title: str, marks: dict[str, tuple[float, float]]) -> None:
    print(f"host steps of {title} (ms after the call's start, median; first call of each):")
    for label, (a, b) in marks.items():
        print(f"  {label:20s} {a:7.3f} -> {b:7.3f}  ({b - a:6.3f})")


def profile_hit(args) -> int:
    """Device-tier KV hits (1984 saved tokens + 48 new) timed and profiled, against 48 tokens cold."""
    runtime = LLMInferenceRuntime(random_model_dir(args.shape, args.cache_dir), device="cuda", dtype="float16",
                                  max_batch_size=1, max_input_length=2048, max_kv_cache_capacity=2080,
                                  kv_reuse=KVReuseSettings(gpu_bytes=1 << 30))
    generator = torch.Generator().manual_seed(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    fresh = lambda n: torch.randint(10, vocab, (n,), generator=generator).tolist()  # noqa: E731
    prefix = fresh(1984)

    def request(ids):
        return LLMGenerationRequest(requests=[{"input_ids": ids}], max_generate_length=1, temperature=0.0)

    for _ in range(3):
        runtime.handle_request(request(prefix + fresh(48)))
    hit = timed(lambda: runtime.handle_request(request(prefix + fresh(48))))
    cold = timed(lambda: runtime.handle_request(request(fresh(48))))
    for name, ids in (("device hit", prefix + fresh(48)), ("48 cold", fresh(48))):
        print_marks(name, host_marks(runtime, request(ids)))
    response = runtime.handle_request(request(prefix + fresh(48)))
    timeline(lambda: runtime.handle_request(request(prefix + fresh(48))), "device hit")
    timeline(lambda: runtime.handle_request(request(fresh(48))), "48 cold")
    print(f"device hit {hit:.3f} ms, 48 cold (with saving) {cold:.3f} ms; last hit: {response.kv_reuse}")
    # The restore's parts, host time (no sync inside) and with its GPU work, median of 20 each.
    store, tokens = runtime.kv_store, prefix + fresh(48)
    fingerprint = runtime.runner.prefix_fingerprint("", len(tokens))
    keys = store.keys(tokens, fingerprint)
    stats = type(response.kv_reuse)()

    def host_ms(fn):
        times = []
        for _ in range(20):
            torch.cuda.synchronize()
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
        return statistics.median(times)

    parts = {"keys (hash chain)": host_ms(lambda: store.keys(tokens, fingerprint)),
             "restore, host": host_ms(lambda: store.restore(0, len(tokens), keys, stats)),
             "restore, with its GPU work": timed(lambda: store.restore(0, len(tokens), keys, stats)),
             "save (nothing new), host": host_ms(lambda: store.save(0, keys, stats))}
    for name, ms in parts.items():
        print(f"  {name:32s} {ms:7.3f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            runtime.handle_request(request(prefix + fresh(48)))
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(str(args.trace.with_suffix(".hit.json")))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--length", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--cache-dir", default="/tmp/edgellm-bench")
    parser.add_argument("--trace", type=Path, help="write a chrome trace of one request here")
    parser.add_argument("--hit", action="store_true",
                        help="profile device-tier KV hits instead: a saved 1984-token prefix + 48 new tokens")
    parser.add_argument("--timeline-only", action="store_true", help="skip the profiler tables (timelines only)")
    args = parser.parse_args()
    if args.hit:
        return profile_hit(args)
    longest = max(2048, *args.length)  # long prompts (issue 19) are prefilled in chunks
    runtime = LLMInferenceRuntime(random_model_dir(args.shape, args.cache_dir), device="cuda", dtype="float16",
                                  max_batch_size=1, max_input_length=longest, max_kv_cache_capacity=longest + 32)
    runner = runtime.runner
    vocab = SHAPES[args.shape]["vocab_size"]
    for length in args.length:
        ids = torch.randint(10, vocab, (length,), generator=torch.Generator().manual_seed(length)).tolist()
        request = LLMGenerationRequest(requests=[{"input_ids": ids}], max_generate_length=1, temperature=0.0)
        runtime.handle_request(request)  # warm-up: graphs captured
        params = runtime._sampling_tensors(runtime._prepare(request)[3], 1)[:5]
        with torch.inference_mode():
            phases = {
                "handle_request": timed(lambda: runtime.handle_request(request)),
                "  _prepare (validate, ids)": timed(lambda: runtime._prepare(request)),
                "  prefill_tokens": timed(lambda: runner.prefill_tokens([ids])),
                "  + sample + tolist": timed(lambda: runner.sample(runner.prefill_tokens([ids]), *params).tolist()),
            }
            if length <= runner.prefill_chunk_size:  # one chunk, one graph
                key = PrefillKey.of(1, length, False, length, from_ids=True)
                phases["  prefill graph replay alone"] = timed(lambda: runner.graphs.get(key).replay())
        print(f"TTFT parts, {args.shape}, prompt {length} (ms, median of 20):")
        for name, ms in phases.items():
            print(f"  {name:32s} {ms:7.3f}")
        print_marks(f"prompt {length}", host_marks(runtime, request))
        timeline(lambda: runtime.handle_request(request), f"prompt {length}")
        if args.timeline_only:
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                runtime.handle_request(request)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
        if args.trace:
            prof.export_chrome_trace(str(args.trace.with_suffix(f".{length}.json")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
