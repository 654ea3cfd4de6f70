"""Model families on a CUDA GPU (issue 16): decode tokens/s and TTFT for each family's smallest
shape (Llama-3.2-1B, Gemma 3 1B, GPT-2 XL, Phi-4-mini; random fp16 weights) against the bandwidth
floor; what Gemma 3's sliding windows save at long contexts (the same shape with every layer global,
decode at 512 and 8192 tokens of context); and the decode attention kernel with a 512-token window
against full attention as the context grows (a window's cost should not grow with it).

Run:  python bench/families.py --json bench/results/families.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from edgellm import benchmark  # noqa: E402
from kernels import graph_us  # noqa: E402  (bench/kernels.py: time inside a CUDA graph, no launch cost)
from edgellm.kernels import attention  # noqa: E402

SHAPES = ("llama-3.2-1b", "gemma3-1b", "gpt2-xl", "phi4-mini")
CACHE = "/tmp/edgellm-bench"


def family_rows(shapes, batches, osl, iterations) -> list[dict]:
    rows = []
    for shape in shapes:
        result = benchmark.run(shape, batches=batches, isl=128, osl=osl, ttft_lens=(128, 1024), iterations=iterations,
                               cache_dir=CACHE)
        benchmark.print_table(result, label=shape)
        rows.append(result)
        torch.cuda.empty_cache()
    return rows


def window_rows(batches, contexts, osl, iterations) -> list[dict]:
    """Gemma 3 1B decode at each context, with its sliding windows and with every layer global."""
    rows = []
    for shape in ("gemma3-1b", "gemma3-1b-global"):
        model_dir = benchmark.random_model_dir(shape, CACHE)
        runner = benchmark.make_runner(model_dir, batches=batches, isl=max(contexts), osl=osl, ttft_lens=())
        bandwidth = benchmark.copy_bandwidth()
        for context in contexts:
            for batch in batches:
                row = benchmark.bench_decode(runner, batch, context, osl, iterations, bandwidth)
                row["shape"] = shape
                benchmark.log(f"  {shape} context {context} b{batch}: {row['ms_per_step']:.3f} ms/step")
                rows.append(row)
        del runner
        torch.cuda.empty_cache()
    return rows


def kernel_rows(contexts, window=512) -> list[dict]:
    """decode_attention on Gemma 3 1B's head shape (4 query heads of 256 over one KV head), batch 16,
    timed inside a CUDA graph (the launch cost of a Python call would hide the kernel)."""
    rows = []
    batch, heads, kv_heads, dim = 16, 4, 1, 256
    for context in contexts:
        kc = torch.randn(batch, kv_heads, context, dim, device="cuda", dtype=torch.float16)
        vc = torch.randn_like(kc)
        q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.float16)
        slots = torch.arange(batch, device="cuda", dtype=torch.int32)
        lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
        row = dict(context=context, window=window, full_mb=2 * kc.numel() * 2 / 1e6,
                   window_mb=2 * batch * kv_heads * min(window, context) * dim * 2 / 1e6)
        for name, w in (("full_us", 0), ("window_us", window)):
            row[name] = graph_us(lambda w=w: attention.decode_attention(q, kc, vc, slots, lens, 0.0625, w))
        rows.append(row)
        benchmark.log(f"  decode_attention context {context}: full {row['full_us']:.1f} us, window {row['window_us']:.1f} us")
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 8192])
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["families", "windows", "kernel"])
    args = parser.parse_args()
    out = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
               torch=torch.__version__, commit=os.environ.get("EDGELLM_COMMIT", "unknown"))
    if "families" not in args.skip:
        out["families"] = family_rows(args.shapes, args.batch, args.osl, args.iterations)
    if "kernel" not in args.skip:
        out["kernel"] = kernel_rows([512, 2048, 8192, 32768])
    if "windows" not in args.skip:
        out["windows"] = window_rows(args.batch, args.contexts, 64, args.iterations)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    print(f"\n{out['device']}  torch {out['torch']}  commit {out['commit']}")
    for r in out.get("families", []):
        cells = "  ".join(f"b{d['batch']} {d['tokens_per_s']:.0f} tok/s ({d['pct_of_floor']:.0f}%)" for d in r["decode"])
        ttft = "  ".join(f"TTFT{t['prompt_len']} {t['ttft_ms']:.2f} ms" for t in r["ttft"])
        print(f"{r['model']:14s} {r['weight_gb']:5.2f} GB  {cells}  {ttft}")
    for r in out.get("kernel", []):
        print(f"decode_attention b16 context {r['context']:6d}: full {r['full_us']:7.1f} us ({r['full_mb']:.0f} MB)  "
              f"window 512 {r['window_us']:6.1f} us ({r['window_mb']:.0f} MB)")
    for r in out.get("windows", []):
        print(f"{r['shape']:17s} context {r['isl']:5d} b{r['batch']:<3d} {r['ms_per_step']:.3f} ms/step "
              f"{r['tokens_per_s']:8.0f} tok/s  floor {r['floor_ms']:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
