"""What a prompt chunk costs the running rows (engine/mixed_steps.py): with 16 rows decoding (512-token
contexts), the time of their decode step alone, of a mixed step carrying a chunk of C prompt tokens
(one row, its prompt starting at 0), and of a prefill step of the same chunk on its own (which the
rows would wait for between two decode steps without mixed steps). All replayed from CUDA graphs,
each timed over back-to-back repetitions; the budget the engine loop's mixed steps take
(prefill_budget) is chosen from this table against bench/serving.py's inter-token latency.

Run on a CUDA GPU:  python bench/mixed_steps.py [--shape llama-3.2-1b] [--chunks 16 64 128 256 512]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/ (bench/kernels.py)

from edgellm.benchmark import SHAPES, random_model_dir, timed  # noqa: E402
from edgellm.engine.runner import LLMEngineRunner  # noqa: E402

ROWS = 16


def per_call_ms(fn, reps: int) -> float:
    fn()  # (a first call: any capture or compile outside the timing)
    seconds, _ = timed(lambda: [fn() for _ in range(reps)])
    return seconds / reps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 64, 128, 256, 512])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--cache-dir", default="/tmp/edgellm-bench-models")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runner = LLMEngineRunner(random_model_dir(args.shape, args.cache_dir), device="cuda", dtype="float16",
                             max_batch_size=ROWS + 1, max_input_length=1024, max_kv_cache_capacity=1024 + 4 * args.reps)
    gen = torch.Generator().manual_seed(0)
    vocab = runner.config.vocab_size
    prompts = torch.randint(3, vocab, (ROWS, 512), generator=gen).tolist()
    chunk_prompt = torch.randint(3, vocab, (max(args.chunks),), generator=gen).tolist()
    with torch.inference_mode():
        first = runner.prefill_tokens(prompts, slots=list(range(ROWS))).argmax(-1)
        runner.start_decode(first, list(range(ROWS)), [0.0] * ROWS, [1] * ROWS, [1.0] * ROWS, [0] * ROWS, [0] * ROWS)
        greedy = ([0.0], [1], [1.0], [0])
        decode = per_call_ms(lambda: runner.decode_launch(), args.reps)
        rows = []
        for chunk in args.chunks:
            ids = chunk_prompt[:chunk]
            mixed = per_call_ms(lambda: runner.mixed_launch([ids], [ROWS], [0], None, *greedy), args.reps)
            alone = per_call_ms(lambda: runner.prefill_tokens([ids], slots=[ROWS]), args.reps)
            rows.append(dict(chunk=chunk, decode_ms=decode, mixed_ms=mixed, prefill_ms=alone,
                             chunk_in_mixed_ms=mixed - decode, separate_ms=decode + alone))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"mixed steps  {args.shape}  {ROWS} rows decoding (512-token contexts): decode step {decode:.3f} ms")
    print("chunk  mixed ms  (chunk's share)  prefill alone ms  decode + prefill ms  mixed/decode")
    for row in rows:
        print(f"{row['chunk']:5d}  {row['mixed_ms']:8.3f}  ({row['chunk_in_mixed_ms']:6.3f})        "
              f"{row['prefill_ms']:8.3f}          {row['separate_ms']:8.3f}         {row['mixed_ms'] / decode:5.2f}x")
    if args.json:
        args.json.write_text(json.dumps(dict(shape=args.shape, rows=rows), indent=2) + "\n")


if __name__ == "__main__":
    main()
