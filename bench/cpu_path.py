"""The CPU path (what every user without a GPU runs): decode tokens/s of the default model in float32,
int8 and int4 (weight-only, quantized at load), and a 512-token prefill against transformers', all in
one process, one after another. The backends' side-by-side table (onnxruntime too) is
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


def decode_tok_s(runner, ids: torch.Tensor, osl: int) -> float:
    greedy = dict(temperature=[0.0], top_k=[1], top_p=[1.0], seeds=[0], offsets=[0])
    runner.start_decode(prefill(runner, ids), [0], **greedy)
    for _ in range(3):  # warm-up
        runner.decode_sample_step()
    began = time.perf_counter()
    for _ in range(osl):
        runner.decode_sample_step()
    runner.end_decode()
    return osl / (time.perf_counter() - began)


def prefill_ms(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


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
        for quantization in (None, "int8", "int4"):
            runner = LLMEngineRunner(model_dir, device="cpu", max_batch_size=1, max_input_length=512,
                                     max_kv_cache_capacity=640, quantization=quantization)
            name = quantization or "float32"
            result["decode"][name] = decode_tok_s(runner, ids, args.osl)
            if quantization is None:
                result["prefill_512_ms"]["edgellm"] = prefill_ms(lambda: prefill(runner, long_ids))
            print(f"{name}: decode {result['decode'][name]:.1f} tok/s", file=sys.stderr)
            del runner
        import transformers

        name = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **{name: torch.float32}).eval()
        result["prefill_512_ms"]["transformers"] = prefill_ms(lambda: model(input_ids=long_ids).logits[:, -1].argmax(-1))
    fp32 = result["decode"]["float32"]
    print(f"decode tok/s: float32 {fp32:.1f}, int8 {result['decode']['int8']:.1f} "
          f"({result['decode']['int8'] / fp32:.2f}x), int4 {result['decode']['int4']:.1f} "
          f"({result['decode']['int4'] / fp32:.2f}x); prefill 512: edgellm {result['prefill_512_ms']['edgellm']:.0f} ms, "
          f"transformers {result['prefill_512_ms']['transformers']:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
