"""Decode-time linear layers: the Triton skinny GEMM (edgellm/kernels/gemv.py) against cuBLAS
(F.linear) on the weight shapes of Llama-3.2-1B and SmolLM2-135M, at 1, 4 and 16 rows (--rows; the GEMV
takes up to gemv.MAX_ROWS), with a sweep of tiles (--tiles N,K,WARPS,STAGES; every tile's time with
--verbose; --only picks shapes by name). Timed "streamed" (bench/kernels.py): distinct weights, more than
L2 holds, back to back from a CUDA graph, as in a decode step. Floor = weight bytes / copy bandwidth.

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

from edgellm.kernels import gemv  # noqa: E402

SHAPES = {  # name: (N, K)
    "1b qkv": (3072, 2048), "1b o": (2048, 2048), "1b gate_up": (16384, 2048), "1b down": (2048, 8192),
    "1b lm_head": (128256, 2048),
    "135m qkv": (960, 576), "135m o": (576, 576), "135m gate_up": (3072, 576), "135m down": (576, 1536),
    "135m lm_head": (49152, 576),
}
TILES = [(16, 256, 4, 4), (32, 256, 4, 4), (32, 512, 4, 3), (64, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 6),
         (64, 128, 8, 4), (16, 1024, 8, 2)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tiles", nargs="*", default=None, metavar="N,K,WARPS,STAGES")
    parser.add_argument("--only", nargs="*", default=None, help="shapes whose name contains one of these")
    parser.add_argument("--verbose", action="store_true", help="every tile's time")
    args = parser.parse_args()
    tiles = [tuple(int(v) for v in t.split(",")) for t in args.tiles] if args.tiles else TILES
    bandwidth = copy_bandwidth()
    results = []
    for name, (n, k) in SHAPES.items():
        if args.only and not any(part in name for part in args.only):
            continue
        nbytes = n * k * 2
        for m in args.rows:
            def fresh(i, tile=None, cublas=False, m=m, n=n, k=k):
                w = torch.randn(n, k, device="cuda", dtype=torch.float16)
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                return (lambda: F.linear(x, w)) if cublas else (lambda: gemv.gemv(x, w, tile=tile))

            cublas = streamed_us(lambda i: fresh(i, cublas=True), nbytes)
            row = dict(shape=name, n=n, k=k, rows=m, floor_us=nbytes / bandwidth * 1e6, cublas_us=cublas, tiles={})
            for tile in tiles:
                try:
                    row["tiles"][str(tile)] = streamed_us(lambda i, tile=tile: fresh(i, tile=tile), nbytes)
                except Exception as exc:  # noqa: BLE001 - a tile that does not compile is skipped
                    print(f"  tile {tile} failed: {type(exc).__name__}", file=sys.stderr)
            best = min((us, tile) for tile, us in row["tiles"].items() if us)
            row["best_tile"], row["best_us"] = best[1], best[0]
            results.append(row)
            print(f"{name:<14s} m={m:<3d} floor {row['floor_us']:7.1f} us  cuBLAS {cublas:7.1f} us "
                  f"({100 * row['floor_us'] / cublas:3.0f}%)  triton best {best[0]:7.1f} us "
                  f"({100 * row['floor_us'] / best[0]:3.0f}%) {best[1]}"
                  + (f"  default {row['tiles'][str(gemv.DEFAULT_TILE)]:7.1f}" if str(gemv.DEFAULT_TILE) in row["tiles"] else ""),
                  flush=True)
            if args.verbose:
                print("    " + "  ".join(f"{tile} {us:.1f}" for tile, us in row["tiles"].items() if us), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(copy_TBps=bandwidth / 1e12, results=results),
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
