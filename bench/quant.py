"""Weight-only quantization on a CUDA GPU (issue 17): decode tokens/s at batch 1 and 16 and TTFT at
1024 tokens on a random-weight shape (default Llama-3.2-1B; --shape llama-3.1-8b where bytes dominate)
for fp16 / fp8 / int8 / int4, each in the same process, with the bytes a step reads; and the
dequantizing GEMV alone on that shape's layer matrices (timed in a CUDA graph) against reading its
packed bytes at copy bandwidth, with K-tile candidates for each format.

Run:  python bench/quant.py [--shape llama-3.1-8b] --json bench/results/quant.json
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench.common import decode_parser  # noqa: E402
from edgellm import benchmark  # noqa: E402
from edgellm.kernels import gemv  # noqa: E402
from edgellm.quant import quantize  # noqa: E402
from kernels import streamed_us  # noqa: E402  (bench/kernels.py: time inside a CUDA graph)

KINDS = (None, "fp8", "int8", "int4")
# gpt-fast's published weight-only ratios over its bf16 decode (Llama-2-7B, A100, batch 1).
GPT_FAST = {None: 1.0, "int8": 155.6 / 104.9, "int4": 196.8 / 104.9}
TILES = [(32, 256, 4, 4), (64, 256, 4, 4), (32, 512, 4, 4), (64, 128, 4, 4), (32, 1024, 4, 4), (16, 512, 4, 4),
         (16, 1024, 4, 4), (16, 256, 4, 3)]
# Batch 1 on the CUDA cores (gemv row_fma): (BLOCK_N, BLOCK_K, warps, stages)
ROW_TILES = [(bn, bk, w, 3) for bn in (2, 4, 8) for bk in (512, 1024) for w in (1, 2)] + \
    [(4, 512, 4, 3), (4, 1024, 4, 3), (32, 256, 4, 3), (16, 256, 2, 3), (8, 256, 2, 3)] + \
    [(16, 512, 4, 3), (16, 512, 4, 4), (32, 512, 4, 3), (16, 1024, 4, 3), (8, 1024, 4, 4), (8, 512, 4, 4),
     (16, 256, 4, 4), (4, 512, 2, 4), (4, 512, 2, 5)]


def decode_rows(shape, batches, osl, iterations, bandwidth, kinds=KINDS, lm_head=(False,)) -> list[dict]:
    model_dir = benchmark.random_model_dir(shape, "/tmp/edgellm-bench")
    rows = []
    for kind in kinds:
        for head in lm_head if kind else (False,):
            name = (kind or "fp16") + ("+head" if head else "")
            runner = benchmark.make_runner(model_dir, batches=batches, isl=128, osl=osl, ttft_lens=(1024,),
                                           quantization=kind, quantize_lm_head=head)
            for batch in batches:
                row = benchmark.bench_decode(runner, batch, 128, osl, iterations, bandwidth)
                row.update(kind=name, weight_gb=benchmark.weight_bytes(runner) / 1e9)
                benchmark.log(f"  {name} b{batch}: {row['tokens_per_s']:.0f} tok/s ({row['pct_of_floor']:.0f}% of floor)")
                rows.append(row)
            rows.append(dict(kind=name, ttft_1024_ms=benchmark.bench_ttft(runner, 1024, iterations)["ttft_ms"]))
            del runner
            torch.cuda.empty_cache()
    return rows


def _copy(qw):
    """Another copy of a weight (the GEMV timings cycle copies, so no weight stays in the 50 MB L2, as
    in a decode step that reads every layer's once)."""
    return qw.clone() if isinstance(qw, torch.Tensor) else dataclasses.replace(qw, data=qw.data.clone())


def kernel_rows(bandwidth, kinds=KINDS, tiles=TILES, row_tiles=ROW_TILES, batches=(1, 16),
                shape="llama-3.2-1b") -> list[dict]:
    rows = []
    for n, k in benchmark.layer_matrices(shape).values():  # (qkv, o, gate/up, down, LM head)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            for kind in kinds:
                qw = w if kind is None else quantize(w, kind)
                nbytes = qw.nbytes if kind else w.numel() * 2
                candidates = [(t, False) for t in tiles or [gemv._tile(kind, n, k)]]
                if m == 1:
                    candidates += [(t, True) for t in row_tiles or [gemv._row_tile(kind, n, k)]]
                for tile, row_fma in candidates:
                    def fresh(_i, qw=qw, tile=tile, row_fma=row_fma, x=x):
                        copy = _copy(qw)
                        return lambda: gemv.gemv(x, copy, tile=tile, row_fma=row_fma)
                    us = streamed_us(fresh, nbytes)
                    if us is None:
                        continue
                    rows.append(dict(n=n, k=k, m=m, kind=kind or "fp16", tile=tile, row_fma=row_fma, us=us,
                                     floor_us=nbytes / bandwidth * 1e6, pct=100 * nbytes / bandwidth * 1e6 / us))
        del w
    return rows


def main() -> int:
    parser = decode_parser(__doc__.splitlines()[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=["decode", "kernel"])
    parser.add_argument("--kinds", nargs="+", default=["fp16", *KINDS[1:]], help="fp16 and / or quantizations")
    parser.add_argument("--sweep", default="all", choices=["all", "row", "none"],
                        help="tiles to time: all candidates, the batch-1 CUDA-core ones (defaults otherwise), none")
    parser.add_argument("--lm-head", action="store_true", help="also decode with the LM head quantized")
    parser.add_argument("--gemv-batch", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    bandwidth = benchmark.copy_bandwidth()
    out = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(), torch=torch.__version__,
               commit=os.environ.get("EDGELLM_COMMIT", "unknown"), copy_TBps=bandwidth / 1e12)
    kinds = [None if k == "fp16" else k for k in args.kinds]
    if "kernel" not in args.skip:
        out["kernel"] = kernel_rows(bandwidth, kinds, TILES if args.sweep == "all" else None,
                                    None if args.sweep == "none" else ROW_TILES, args.gemv_batch, args.shape)
    if "decode" not in args.skip:
        out["decode"] = decode_rows(args.shape, args.batch, args.osl, args.iterations, bandwidth, kinds,
                                    (False, True) if args.lm_head else (False,))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    print(f"\n{out['device']}  torch {out['torch']}  commit {out['commit']}  copy {out['copy_TBps']:.2f} TB/s")
    best = {}
    for r in out.get("kernel", []):
        key = (r["n"], r["k"], r["m"], r["kind"], r["row_fma"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    for r in out.get("kernel", []):
        kind = None if r["kind"] == "fp16" else r["kind"]
        default = gemv._row_tile(kind, r["n"], r["k"]) if r["row_fma"] else gemv._tile(kind, r["n"], r["k"])
        if tuple(r["tile"]) in (tuple(best[(r["n"], r["k"], r["m"], r["kind"], r["row_fma"])]["tile"]), tuple(default)):
            print(f"gemv {r['n']:6d}x{r['k']:<5d} m{r['m']:<2d} {r['kind']:5s} {'fma ' if r['row_fma'] else 'dot '}"
                  f"tile {str(tuple(r['tile'])):18s} {r['us']:7.1f} us  floor {r['floor_us']:6.1f}  {r['pct']:3.0f}%"
                  + ("  (default)" if tuple(r["tile"]) == tuple(default) else ""))
    decode = out.get("decode", [])
    fp16 = {r["batch"]: r["tokens_per_s"] for r in decode if r.get("kind") == "fp16" and "batch" in r}
    if not fp16:
        decode = []  # ratios need the fp16 rows
    ttft16 = next((r["ttft_1024_ms"] for r in decode if r.get("kind") == "fp16" and "ttft_1024_ms" in r), None)
    for r in decode:
        if "batch" in r:
            ratio = r["tokens_per_s"] / fp16[r["batch"]]
            peer = GPT_FAST.get(None if r["kind"] == "fp16" else r["kind"].removesuffix("+head"))
            print(f"{r['kind']:10s} b{r['batch']:<3d} {r['tokens_per_s']:7.0f} tok/s  {ratio:4.2f}x fp16  weights "
                  f"{r['weight_gb']:.2f} GB  {r['pct_of_floor']:3.0f}% of floor" + (f"  (gpt-fast {peer:.2f}x)" if peer else ""))
        else:
            print(f"{r['kind']:10s} TTFT 1024: {r['ttft_1024_ms']:.2f} ms ({r['ttft_1024_ms'] / ttft16:.2f}x fp16)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
