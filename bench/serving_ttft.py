"""What the HTTP server adds to time to first token at one client (issue 41's <= 1 ms target), in a short
run: the same sequential requests (token-id prompts, greedy, ignore_eos, a few tokens each) first
in-process (submit -> the first token on the host, the engine's TTFT) and then through an `edgellm serve`
process on loopback (bench/serving_http.py's raw-socket client: request sent -> first streamed text; and
the server's own mean from /metrics, arrival -> first token on the engine, which splits the gap between
the server's request handling before the engine and the reply's way back). The first requests of each
path are warm-up, left out.

Run:  python bench/serving_ttft.py [--shape llama-3.2-1b | --model-dir DIR] [--device cuda] [--requests 40]
      [--prompt-tokens 128] [--max-tokens 8] [--json F]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/
sys.path.insert(1, str(Path(__file__).resolve().parent))  # (after it: bench/serving_http.py by name)

from edgellm import LLMGenerationRequest, LLMInferenceRuntime  # noqa: E402
from edgellm.benchmark import SHAPES, random_model_dir  # noqa: E402
from serving_http import StreamClient, ensure_tokenizer, server_ttft_totals, start_server, stop_server  # noqa: E402

WARMUP = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--model-dir", type=Path, help="a model directory instead of a random-weight shape")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--cache-dir", default="/tmp/edgellm-bench-models")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model_dir = args.model_dir or random_model_dir(args.shape, args.cache_dir)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    ensure_tokenizer(Path(model_dir), vocab)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_tokens)] for _ in range(WARMUP + args.requests)]
    engine = dict(max_batch=4, max_input=args.prompt_tokens + 8, capacity=args.prompt_tokens + args.max_tokens + 16)
    dtype = "float16" if args.device == "cuda" else "float32"

    runtime = LLMInferenceRuntime(model_dir, device=args.device, dtype=dtype, max_batch_size=engine["max_batch"],
                                  max_input_length=engine["max_input"], max_kv_cache_capacity=engine["capacity"])
    in_process = []
    for prompt in prompts:
        response = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": prompt}], temperature=0,
                                                               max_generate_length=args.max_tokens, ignore_eos=True))
        in_process.append(response.token_times_ms[0][0])
    in_process = in_process[WARMUP:]
    del runtime

    process, port = start_server(model_dir, prefill_budget=None, device=args.device, **engine)
    try:
        client, http, server = StreamClient(port), [], None
        for i, prompt in enumerate(prompts):
            if i == WARMUP:
                server = server_ttft_totals(port)
            body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0,
                               "ignore_eos": True, "stream": True}).encode()
            sent, arrivals, _ = client.stream(body)
            http.append((arrivals[0] - sent) * 1e3)
        client.close()
        total, count = server_ttft_totals(port)
        server_mean = (total - server[0]) / (count - server[1]) * 1e3
    finally:
        stop_server(process)
    http = http[WARMUP:]
    row = dict(device=args.device, model=str(model_dir), requests=args.requests, prompt_tokens=args.prompt_tokens,
               in_process_p50_ms=statistics.median(in_process), in_process_mean_ms=statistics.mean(in_process),
               http_p50_ms=statistics.median(http), http_mean_ms=statistics.mean(http), server_mean_ms=server_mean)
    print(f"TTFT at one client, {args.requests} requests of {args.prompt_tokens} prompt tokens ({args.device}):")
    print(f"  in-process  p50 {row['in_process_p50_ms']:.2f} ms  mean {row['in_process_mean_ms']:.2f} ms")
    print(f"  HTTP        p50 {row['http_p50_ms']:.2f} ms  mean {row['http_mean_ms']:.2f} ms  "
          f"(+{row['http_p50_ms'] - row['in_process_p50_ms']:.2f} ms at p50)")
    print(f"  server-side mean {server_mean:.2f} ms (arrival -> first token on its engine: "
          f"+{server_mean - row['in_process_mean_ms']:.2f} ms before the reply's way back)")
    if args.json:
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
