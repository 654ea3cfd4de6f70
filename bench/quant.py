"""Weight-only quantization on a CUDA GPU (issue 17): decode tokens/s at batch 1 and 16 and TTFT at
1024 tokens on the Llama-3.2-1B shape (random weights) for fp16 / fp8 / int8 / int4, each in the same
process, with the bytes a step reads; and the dequantizing GEMV alone on the layer shapes (timed in a
CUDA graph) against reading its packed bytes at copy bandwidth, with K-tile candidates for each format.

Run:  python bench/quant.py --json bench/results/quant.json
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
from edgellm.kernels import gemv  # noqa: E402
from edgellm.quant import quantize  # noqa: E402
from kernels import graph_us  # noqa: E402  (bench/kernels.py: time inside a CUDA graph)

KINDS = (None, "fp8", "int8", "int4")
# gpt-fast's published weight-only ratios over its bf16 decode (Llama-2-7B, A100, batch 1).
GPT_FAST = {None: 1.0, "int8": 155.6 / 104.9, "int4": 196.8 / 104.9}
TILES = [(32, 256, 4, 4), (64, 256, 4, 4), (32, 512, 4, 4), (64, 128, 4, 4), (32, 1024, 4, 4), (16, 512, 4, 4),
         (16, 1024, 4, 4), (16, 256, 4, 3)]


def decode_rows(shape, batches, osl, iterations, bandwidth, kinds=KINDS) -> list[dict]:
    model_dir = benchmark.random_model_dir(shape, "/tmp/edgellm-bench")
    rows = []
    for kind in kinds:
        runner = benchmark.make_runner(model_dir, batches=batches, isl=128, osl=osl, ttft_lens=(1024,), quantization=kind)
        for batch in batches:
            row = benchmark.bench_decode(runner, batch, 128, osl, iterations, bandwidth)
            row.update(kind=kind or "fp16", weight_gb=benchmark.weight_bytes(runner) / 1e9)
            benchmark.log(f"  {kind or 'fp16'} b{batch}: {row['tokens_per_s']:.0f} tok/s ({row['pct_of_floor']:.0f}% of floor)")
            rows.append(row)
        rows.append(dict(kind=kind or "fp16", ttft_1024_ms=benchmark.bench_ttft(runner, 1024, iterations)["ttft_ms"]))
        del runner
        torch.cuda.empty_cache()
    return rows


def kernel_rows(bandwidth, kinds=KINDS, tiles=TILES) -> list[dict]:
    rows = []
    for n, k in ((3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)):  # the 1B shape's qkv, o, gate_up, down
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            for kind in kinds:
                qw = w if kind is None else quantize(w, kind)
                nbytes = qw.nbytes if kind else w.numel() * 2
                for tile in tiles or [gemv._tile(kind, n)]:
                    us = graph_us(lambda: gemv.gemv(x, qw, tile=tile))
                    if us is None:
                        continue
                    rows.append(dict(n=n, k=k, m=m, kind=kind or "fp16", tile=tile, us=us,
                                     floor_us=nbytes / bandwidth * 1e6, pct=100 * nbytes / bandwidth * 1e6 / us))
        del w
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], choices=["decode", "kernel"])
    parser.add_argument("--kinds", nargs="+", default=["fp16", *KINDS[1:]], help="fp16 and / or quantizations")
    parser.add_argument("--default-tiles", action="store_true", help="time each format's default tile only")
    args = parser.parse_args()
    bandwidth = benchmark.copy_bandwidth()
    out = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(), torch=torch.__version__,
               commit=os.environ.get("EDGELLM_COMMIT", "unknown"), copy_TBps=bandwidth / 1e12)
    kinds = [None if k == "fp16" else k for k in args.kinds]
    if "kernel" not in args.skip:
        out["kernel"] = kernel_rows(bandwidth, kinds, None if args.default_tiles else TILES)
    if "decode" not in args.skip:
        out["decode"] = decode_rows(args.shape, args.batch, args.osl, args.iterations, bandwidth, kinds)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    print(f"\n{out['device']}  torch {out['torch']}  commit {out['commit']}  copy {out['copy_TBps']:.2f} TB/s")
    best = {}
    for r in out.get("kernel", []):
        key = (r["n"], r["k"], r["m"], r["kind"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    for r in out.get("kernel", []):
        default = gemv._tile(None if r["kind"] == "fp16" else r["kind"], r["n"])
        if tuple(r["tile"]) in (tuple(best[(r["n"], r["k"], r["m"], r["kind"])]["tile"]), tuple(default)):
            print(f"gemv {r['n']:5d}x{r['k']:<5d} m{r['m']:<2d} {r['kind']:5s} tile {str(tuple(r['tile'])):18s} "
                  f"{r['us']:7.1f} us  floor {r['floor_us']:6.1f}  {r['pct']:3.0f}%")
    decode = out.get("decode", [])
    fp16 = {r["batch"]: r["tokens_per_s"] for r in decode if r.get("kind") == "fp16" and "batch" in r}
    ttft16 = next((r["ttft_1024_ms"] for r in decode if r.get("kind") == "fp16" and "ttft_1024_ms" in r), None)
    for r in decode:
        if "batch" in r:
            ratio = r["tokens_per_s"] / fp16[r["batch"]]
            peer = GPT_FAST.get(None if r["kind"] == "fp16" else r["kind"])
            print(f"{r['kind']:5s} b{r['batch']:<3d} {r['tokens_per_s']:7.0f} tok/s  {ratio:4.2f}x fp16  weights "
                  f"{r['weight_gb']:.2f} GB  {r['pct_of_floor']:3.0f}% of floor" + (f"  (gpt-fast {peer:.2f}x)" if peer else ""))
        else:
            print(f"{r['kind']:5s} TTFT 1024: {r['ttft_1024_ms']:.2f} ms ({r['ttft_1024_ms'] / ttft16:.2f}x fp16)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
