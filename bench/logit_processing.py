"""What per-slot logit processing costs (kernels/logit_processing.py, engine/logit_processing.py): the
processing kernels on [rows, vocab] float32 logits with every row enabled and masked (timed in a CUDA graph), against
their torch reference (eager) and the bandwidth floor of the bytes they move (logits read and written
twice, counts, seen and bias read), and a decode step of 16 rows (graphs, 512-token contexts) with no slot processing (the plain
graph), one slot, and every slot processing (penalties, bias, min_p), then with logprobs written too (one
slot asking: the step writes every row's).

Run on a CUDA GPU:  python bench/logit_processing.py [--shape llama-3.2-1b] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not bench/ (bench/kernels.py)

from edgellm.benchmark import SHAPES, copy_bandwidth, random_model_dir, timed  # noqa: E402
from edgellm.engine.logit_processing import LogitSettings  # noqa: E402
from edgellm.engine.runner import LLMEngineRunner  # noqa: E402
from edgellm.kernels import logit_processing as lp  # noqa: E402

ROWS = 16
SETTINGS = LogitSettings(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2, min_p=0.05,
                         logit_bias=((11, 2.0), (12, -100.0)))


def per_call_us(fn, reps: int) -> float:
    fn()
    seconds, _ = timed(lambda: [fn() for _ in range(reps)])
    return seconds / reps * 1e6


def graphed_us(fn, reps: int, per_graph: int = 20) -> float:
    """fn's GPU time: `per_graph` calls captured in one CUDA graph, replayed (as a decode step runs them;
    an eager call's time here would be Triton's launch overhead on the host)."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    graph.replay()
    rounds = max(1, reps // per_graph)
    seconds, _ = timed(lambda: [graph.replay() for _ in range(rounds)])
    return seconds / (rounds * per_graph) * 1e6


def kernel_rows(vocab: int, reps: int, bandwidth: float) -> list[dict]:
    out = []
    for rows in (1, ROWS):
        slots = rows + 1
        state = dict(enabled=torch.ones(slots, dtype=torch.int32, device="cuda"),
                     counts=torch.randint(0, 2, (slots, vocab), dtype=torch.int32, device="cuda"),
                     seen=torch.randint(0, 2, (slots, vocab), dtype=torch.uint8, device="cuda"),
                     bias=torch.zeros(slots, vocab, device="cuda"), presence=torch.full((slots,), 0.5, device="cuda"),
                     frequency=torch.full((slots,), 0.3, device="cuda"), repetition=torch.full((slots,), 1.2, device="cuda"),
                     min_p=torch.full((slots,), 0.05, device="cuda"), temperature=torch.ones(slots, device="cuda"),
                     masked=torch.ones(slots, dtype=torch.int32, device="cuda"),
                     mask=torch.randint(-2**31, 2**31 - 1, (slots, (vocab + 31) // 32), dtype=torch.int32,
                                        device="cuda"))
        logits = torch.randn(rows, vocab, device="cuda")
        row_slots = torch.arange(rows, dtype=torch.int32, device="cuda")
        kernel = graphed_us(lambda: lp.process_logits(logits, row_slots, **state), reps)
        reference = per_call_us(lambda: lp.process_logits_ref(logits, row_slots, **state), reps)
        moved = rows * vocab * (4 + 4 + 4 + 4 + 1) + rows * vocab // 8 + rows * vocab * 4 * 2  # (the mask's bits;
        # the floor's second pass: read + write)
        out.append(dict(rows=rows, vocab=vocab, kernel_us=kernel, reference_us=reference,
                        floor_us=moved / bandwidth * 1e6))
        print(json.dumps(out[-1]), file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--cache-dir", default="/tmp/edgellm-bench-models")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runner = LLMEngineRunner(random_model_dir(args.shape, args.cache_dir), device="cuda", dtype="float16",
                             max_batch_size=ROWS, max_input_length=1024, max_kv_cache_capacity=1024 + 8 * args.reps)
    bandwidth = copy_bandwidth()
    kernels = kernel_rows(runner.config.vocab_size, args.reps, bandwidth)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, runner.config.vocab_size, (ROWS, 512), generator=gen).tolist()
    steps = {}
    with torch.inference_mode():
        first = runner.prefill_tokens(prompts, slots=list(range(ROWS))).argmax(-1)
        runner.start_decode(first, list(range(ROWS)), [1.0] * ROWS, [0] * ROWS, [1.0] * ROWS, list(range(ROWS)),
                            [0] * ROWS)
        steps["none"] = per_call_us(lambda: runner.decode_launch().wait(), args.reps)
        runner.set_logit_processing(0, SETTINGS, prompts[0], 1.0)
        steps["one slot"] = per_call_us(lambda: runner.decode_launch().wait(), args.reps)
        for slot in range(1, ROWS):
            runner.set_logit_processing(slot, SETTINGS, prompts[slot], 1.0)
        steps["every slot"] = per_call_us(lambda: runner.decode_launch().wait(), args.reps)
        runner.want_logprobs(0, True)
        steps["+ logprobs"] = per_call_us(lambda: runner.decode_launch().wait(), args.reps)
        for slot in range(ROWS):
            runner.clear_logit_processing(slot)
        steps["logprobs only"] = per_call_us(lambda: runner.decode_launch().wait(), args.reps)
    print(f"logit processing  {args.shape}  copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print("rows   vocab  kernel us  reference us  floor us  kernel/floor")
    for row in kernels:
        print(f"{row['rows']:4d} {row['vocab']:7d} {row['kernel_us']:10.1f} {row['reference_us']:13.1f} "
              f"{row['floor_us']:9.1f} {row['kernel_us'] / row['floor_us']:12.2f}")
    print(f"decode step, {ROWS} rows (graphs, sampled at temperature 1):")
    for name, us in steps.items():
        print(f"  processing {name:10s} {us:8.1f} us  ({us / steps['none']:.3f}x)")
    if args.json:
        args.json.write_text(json.dumps(dict(shape=args.shape, kernels=kernels, decode_step_us=steps), indent=2) + "\n")


if __name__ == "__main__":
    main()
