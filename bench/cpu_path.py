"""The CPU path (what every user without a GPU runs): decode tokens/s of the default model in float32,
int8 and int4 (weight-only, quantized at load; their decode steps interleaved), and a 512-token prefill
against transformers' (interleaved too), all in one process. The backends' side-by-side table (onnxruntime too) is
`edgellm bench --backend triton onnxruntime transformers --device cpu`.

Run:  python bench/cpu_path.py [--osl 32] [--json bench/results/cpu-path.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# The repository root instead of bench/ (whose kernels.py would shadow the `kernels` package transformers probes).
sys.path[0] = str(Path(__file__).resolve().parents[1])

import edgellm  # noqa: E402
from edgellm import LLMEngineRunner  # noqa: E402
from edgellm.benchmark import prefill  # noqa: E402


def decode_tok_s(runners: dict, ids: torch.Tensor, osl: int) -> dict:
    """{name: decode tokens/s} of one-row greedy decoding, the runners' steps interleaved (one step of
    each in turn, so that the machine's drift falls on all of them), from the median step."""
    greedy = dict(temperature=[0.0], top_k=[1], top_p=[1.0], seeds=[0], offsets=[0])
    for runner in runners.values():
        runner.start_decode(prefill(runner, ids), [0], **greedy)
        for _ in range(3):  # warm-up
            runner.decode_sample_step()
    times = {name: [] for name in runners}
    for _ in range(osl):
        for name, runner in runners.items():
            began = time.perf_counter()
            runner.decode_sample_step()
            times[name].append(time.perf_counter() - began)
    for runner in runners.values():
        runner.end_decode()
    return {name: 1.0 / statistics.median(steps) for name, steps in times.items()}


def prefill_ms(runs: dict, repeats: int = 5) -> dict:
    """{name: median ms} of each prefill, after a warm-up of each, the runs interleaved."""
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            began = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--osl", type=int, default=32)
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model_dir = edgellm.default_model_dir()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 40000, (1, args.isl), generator=generator)
    long_ids = torch.randint(10, 40000, (1, 512), generator=generator)
    result = dict(model=str(model_dir), machine=platform.processor() or platform.machine(),
                  threads=torch.get_num_threads(), isl=args.isl, osl=args.osl, decode={}, prefill_512_ms={})
    with torch.inference_mode():
        runners = {quantization or "float32": LLMEngineRunner(model_dir, device="cpu", max_batch_size=1,
                                                              max_input_length=512, max_kv_cache_capacity=640,
                                                              quantization=quantization)
                   for quantization in (None, "int8", "int4")}
        result["decode"] = decode_tok_s(runners, ids, args.osl)
        ours = runners.pop("float32")
        del runners
        import transformers

        name = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **{name: torch.float32}).eval()
        result["prefill_512_ms"] = prefill_ms({"edgellm": lambda: prefill(ours, long_ids),
                                               "transformers": lambda: model(input_ids=long_ids).logits[:, -1].argmax(-1)})
    fp32 = result["decode"]["float32"]
    print(f"decode tok/s: float32 {fp32:.1f}, int8 {result['decode']['int8']:.1f} "
          f"({result['decode']['int8'] / fp32:.2f}x), int4 {result['decode']['int4']:.1f} "
          f"({result['decode']['int4'] / fp32:.2f}x); prefill 512: edgellm {result['prefill_512_ms']['edgellm']:.0f} ms, "
          f"transformers {result['prefill_512_ms']['transformers']:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
