"""The server's GIL switch interval against its HTTP overhead: one in-process baseline (the closed loop
of bench/serving.py at 1 and 16 clients), then one `edgellm serve` per `--gil-switch-interval` value
through the same workloads (bench/serving_http.py's clients).

Run on a CUDA GPU:  python bench/serving_switch_interval.py [MS ...]   (default: 5 0.25)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/ (bench/kernels.py)
sys.path.insert(1, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from edgellm import LLMInferenceRuntime  # noqa: E402
from edgellm.benchmark import random_model_dir  # noqa: E402
from serving import _job, closed_loop, percentile, workload  # noqa: E402
from serving_http import ensure_tokenizer, http_closed_loop, start_server, stop_server  # noqa: E402

CLIENTS = (1, 16)


def main() -> None:
    intervals = sys.argv[1:] or ["5", "0.25"]
    model_dir = random_model_dir("llama-3.2-1b", "/tmp/edgellm-bench-models")
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ensure_tokenizer(model_dir, vocab)
    runtime = LLMInferenceRuntime(model_dir, device="cuda", dtype="float16", max_batch_size=16,
                                  max_input_length=1024, max_kv_cache_capacity=1280)
    runtime.eos_token_ids = frozenset()
    runtime.capture_graphs()
    closed_loop(runtime, workload(48, vocab, seed=99), 16, False)
    base = {c: closed_loop(runtime, workload(max(64, 8 * c), vocab, seed=c), c, False) for c in CLIENTS}
    runtime.close()
    del runtime
    torch.cuda.empty_cache()
    print("interval  clients  in-process tok/s  http tok/s  ratio  TTFT p50 in/http ms  ITL p50 in/http ms  errors")
    for interval in intervals:
        process, port = start_server(model_dir, max_batch=16, max_input=1024, capacity=1280, prefill_budget=None,
                                     options=("--gil-switch-interval", interval))
        try:
            http_closed_loop(port, [_job(r) for r in workload(48, vocab, seed=99)], 16, percentile)
            for clients in CLIENTS:
                row = http_closed_loop(port, [_job(r) for r in workload(max(64, 8 * clients), vocab, seed=clients)],
                                       clients, percentile)
                b = base[clients]
                print(f"{interval:>8} {clients:8d} {b['tokens_per_s']:17.0f} {row['tokens_per_s']:11.0f} "
                      f"{row['tokens_per_s'] / b['tokens_per_s']:6.3f}  "
                      f"{b['ttft_p50_ms']:8.2f} / {row['ttft_p50_ms']:<8.2f}"
                      f"  {b['itl_p50_ms']:6.2f} / {row['itl_p50_ms']:<6.2f}  {len(row['errors'])}", flush=True)
        finally:
            stop_server(process)


if __name__ == "__main__":
    main()
