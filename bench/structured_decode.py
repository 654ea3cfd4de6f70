"""What structured output costs per token on the GPU: a random-weight model of a named shape (default the
1B Llama shape, 128k vocabulary, a synthetic byte-level tokenizer) decodes B rows (B = 1 and 16) under a
JSON schema and free, in the same run, greedy, the same token count per row. The schema keeps the rows
inside long strings (a random model seldom draws the closing quote), so constrained rows run their full
length as free ones (ignore_eos) do; each row's first token (its prefill's) is left out.

Rows per batch size: free (whole steps, run ahead), json_schema (steps in halves: the forward, then the
step before read and the next masks filled on XGrammar's threads and copied behind it, then the draw),
and json_schema with run-ahead off (EDGELLM_RUN_AHEAD=0's path: whole steps, each read before the next:
what the halves save). Per row kind: the inter-token time (ms per step, mean over rows), tokens/s, and
the cost against free. Then each schema of bench/structured.py compiled against this vocabulary (ms).

Run on a CUDA GPU:  python bench/structured_decode.py [--shape llama-3.2-1b] [--tokens 128] [--json F]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/
sys.path.insert(1, str(Path(__file__).resolve().parent))  # (after it: bench/common.py, bench/structured.py)

from common import write_synthetic_tokenizer  # noqa: E402
from edgellm import LLMGenerationRequest, LLMInferenceRuntime  # noqa: E402
from edgellm.benchmark import SHAPES, log, random_model_dir  # noqa: E402
from structured import CASES, compile_times  # noqa: E402

SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "body": {"type": "string"}},
          "required": ["title", "body"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "note", "schema": SCHEMA, "strict": True}}


def step_ms(response) -> tuple[float, int]:
    """(mean over rows of the ms between a row's decoded tokens, the tokens they decoded)."""
    per_row, tokens = [], 0
    for times in response.token_times_ms:
        if len(times) > 2:
            per_row.append((times[-1] - times[1]) / (len(times) - 2))
            tokens += len(times) - 1
    return sum(per_row) / len(per_row), tokens


def run(runtime, rows: int, tokens: int, constrained: bool, repeats: int) -> dict:
    items = [{"prompt": f"Write note {i} as JSON:"} for i in range(rows)]
    if constrained:
        items = [dict(item, response_format=FORMAT) for item in items]
    request = LLMGenerationRequest(requests=items, max_generate_length=tokens, temperature=0,
                                   ignore_eos=not constrained)
    runtime.handle_request(dataclasses.replace(request, max_generate_length=8))  # (graphs captured)
    best = None
    for _ in range(repeats):
        response = runtime.handle_request(request)
        ms, decoded = step_ms(response)
        if best is None or ms < best[0]:
            best = (ms, decoded, response)
    ms, decoded, response = best
    if constrained:
        for text in response.output_texts:  # (a mask that did not hold shows here)
            if not text.startswith('{"title":'):
                raise SystemExit(f"a constrained row wrote {text[:60]!r}")
    return dict(step_ms=ms, tokens_per_s=rows * 1e3 / ms, decoded=decoded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cpu: a float32 smoke run of the script")
    parser.add_argument("--cache-dir", default="/tmp/edgellm-bench-models")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model_dir = random_model_dir(args.shape, args.cache_dir)
    write_synthetic_tokenizer(model_dir, SHAPES[args.shape]["vocab_size"])
    dtype = "float16" if args.device == "cuda" else "float32"
    runtime = LLMInferenceRuntime(model_dir, device=args.device, dtype=dtype, max_batch_size=max(args.batch),
                                  max_kv_cache_capacity=512)
    switches = runtime.runner.switches
    results = {}
    for rows in args.batch:
        log(f"batch {rows} ...")
        free = run(runtime, rows, args.tokens, False, args.repeats)
        halves = run(runtime, rows, args.tokens, True, args.repeats)
        runtime.runner.switches = dataclasses.replace(switches, run_ahead=False)
        whole = run(runtime, rows, args.tokens, True, args.repeats)
        runtime.runner.switches = switches
        results[rows] = dict(free=free, json_schema=halves, json_schema_whole_steps=whole)
    compile_ms = compile_times(runtime)
    print(f"\n{args.shape}, {args.tokens} tokens a row, greedy (ms per step; cost against free decoding)")
    print(f"{'batch':>5} {'rows':<26} {'ms/step':>8} {'tok/s':>8} {'cost':>7} {'tokens':>7}")
    for rows, kinds in results.items():
        for kind, row in kinds.items():
            cost = row["step_ms"] / kinds["free"]["step_ms"] - 1
            print(f"{rows:>5} {kind:<26} {row['step_ms']:8.3f} {row['tokens_per_s']:8.0f} {cost:+7.1%} "
                  f"{row['decoded']:7d}")
    ordered = sorted(compile_ms)
    print(f"grammar compile ({len(CASES)} schemas of bench/structured.py, {SHAPES[args.shape]['vocab_size']} "
          f"tokens): median {ordered[len(ordered) // 2]:.1f} ms, max {ordered[-1]:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(dict(shape=args.shape, tokens=args.tokens, results=results,
                                             compile_ms=compile_ms), indent=2) + "\n")


if __name__ == "__main__":
    main()
