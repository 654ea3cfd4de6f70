"""Decode-time linear layers: the Triton skinny GEMM (edgellm/kernels/gemv.py) against cuBLAS
(F.linear) on the weight shapes of Llama-3.2-1B and SmolLM2-135M, at 1, 4 and 16 rows, with a sweep
of tiles. Timed "streamed" (bench/kernels.py): distinct weights, more than L2 holds, back to back
from a CUDA graph, as in a decode step. Floor = weight bytes / copy bandwidth.

Run on a CUDA GPU:  python bench/gemv.py --json bench/results/gemv.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import streamed_us  # noqa: E402

from edgellm.benchmark import copy_bandwidth  # noqa: E402

from edgellm.kernels import fused_gemv, gemv, rms_norm, silu_mul  # noqa: E402

SHAPES = {  # name: (N, K)
    "1b qkv": (3072, 2048), "1b o": (2048, 2048), "1b gate_up": (16384, 2048), "1b down": (2048, 8192),
    "1b lm_head": (128256, 2048),
    "135m qkv": (960, 576), "135m o": (576, 576), "135m gate_up": (3072, 576), "135m down": (576, 1536),
    "135m lm_head": (49152, 576),
}
TILES = [(16, 256, 4, 4), (32, 256, 4, 4), (32, 512, 4, 3), (64, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 6),
         (64, 128, 8, 4), (16, 1024, 8, 2)]


def fused_rows(rows_list) -> list[dict]:
    """The fused prologue GEMVs (kernels/fused_gemv.py) against the two launches they replace."""
    out = []
    for name, (n, k), mode in (("1b qkv + add_rms_norm", (3072, 2048), "norm"), ("1b down + silu_mul", (2048, 8192), "silu"),
                               ("135m qkv + add_rms_norm", (960, 576), "norm"), ("135m down + silu_mul", (576, 1536), "silu")):
        for m in rows_list:
            def fresh(i, fused, m=m, n=n, k=k, mode=mode):
                w = torch.randn(n, k, device="cuda", dtype=torch.float16)
                if mode == "norm":
                    x, r, nw = (torch.randn(m, k, device="cuda", dtype=torch.float16) for _ in range(3))
                    if fused:
                        return lambda: fused_gemv.add_rms_norm_gemv(x, r, nw[0], 1e-5, w)
                    return lambda: F.linear(rms_norm.add_rms_norm(x, r, nw[0], 1e-5)[0], w)
                gu = torch.randn(m, 2 * k, device="cuda", dtype=torch.float16)
                return (lambda: fused_gemv.silu_mul_gemv(gu, w)) if fused else (lambda: F.linear(silu_mul.silu_mul(gu), w))

            two = streamed_us(lambda i: fresh(i, False), n * k * 2)
            one = streamed_us(lambda i: fresh(i, True), n * k * 2)
            out.append(dict(shape=name, rows=m, unfused_us=two, fused_us=one))
            print(f"{name:<26s} m={m:<3d} two launches {two:7.1f} us   fused {one:7.1f} us", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    results = []
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        for m in args.rows:
            def fresh(i, tile=None, cublas=False, m=m, n=n, k=k):
                w = torch.randn(n, k, device="cuda", dtype=torch.float16)
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                return (lambda: F.linear(x, w)) if cublas else (lambda: gemv.gemv(x, w, tile=tile))

            cublas = streamed_us(lambda i: fresh(i, cublas=True), nbytes)
            row = dict(shape=name, n=n, k=k, rows=m, floor_us=nbytes / bandwidth * 1e6, cublas_us=cublas, tiles={})
            for tile in TILES:
                try:
                    row["tiles"][str(tile)] = streamed_us(lambda i, tile=tile: fresh(i, tile=tile), nbytes)
                except Exception as exc:  # noqa: BLE001 - a tile that does not compile is skipped
                    print(f"  tile {tile} failed: {type(exc).__name__}", file=sys.stderr)
            best = min((us, tile) for tile, us in row["tiles"].items() if us)
            row["best_tile"], row["best_us"] = best[1], best[0]
            results.append(row)
            print(f"{name:<14s} m={m:<3d} floor {row['floor_us']:7.1f} us  cuBLAS {cublas:7.1f} us "
                  f"({100 * row['floor_us'] / cublas:3.0f}%)  triton best {best[0]:7.1f} us "
                  f"({100 * row['floor_us'] / best[0]:3.0f}%) {best[1]}  default {row['tiles'][str(gemv.DEFAULT_TILE)]:7.1f}",
                  flush=True)
    fused = fused_rows(args.rows)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(copy_TBps=bandwidth / 1e12, results=results, fused=fused),
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
