"""The int4 GEMV's tensor-core path (kernels/gemv_weights.py `_int4_dots`) at 16-64 rows, variant by
variant, on a shape's layer matrices (default: the Llama-3.2-1B and Llama-3.1-8B shapes), each timed in
a CUDA graph over copies that do not fit the L2 (bench/kernels.py `streamed_us`), against its packed
bytes at copy bandwidth and against fp16 and int8 through their default tiles in the same run.

Variants: the dots' operand order (RunSettings.int4_operands: x W^T with the rows first, or W x^T with
the unpacked weights first) and how codes become floats (int4_codes: float32 bits, or float16 bits),
each over a few (BLOCK_N, BLOCK_K, warps, stages) tiles.

Run on a CUDA GPU:  python bench/int4_gemm.py [--shape llama-3.2-1b llama-3.1-8b] [--rows 16 64] --json out.json
"""

from __future__ import annotations

import argparse
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

from edgellm import benchmark  # noqa: E402
from edgellm.kernels import gemv  # noqa: E402
from edgellm.kernels.dispatch import run_with  # noqa: E402
from edgellm.quant import quantize  # noqa: E402
from kernels import streamed_us  # noqa: E402  (bench/kernels.py)

VARIANTS = [("rows", "f32"), ("weights", "f32"), ("weights", "f16")]
TILES = [(32, 128, 2, 4), (64, 128, 4, 3), (64, 128, 4, 5), (64, 64, 4, 5), (128, 128, 8, 3), (128, 64, 4, 4),
         (64, 128, 4, 4, 2), (64, 128, 4, 4, 4), (32, 128, 2, 4, 2)]  # (a fifth entry: split-K, kernels/split_k.py)


def _copy(w):
    return w.clone() if isinstance(w, torch.Tensor) else dataclasses.replace(w, data=w.data.clone())


def _time(weight, x, nbytes: int, tile=None, **settings) -> float | None:
    def fresh(_i):
        copy = _copy(weight)

        def call():
            with run_with(**settings):
                return gemv.gemv(x, copy, tile=tile, row_fma=False)
        return call
    try:
        return streamed_us(fresh, nbytes)
    except Exception as error:  # noqa: BLE001 - a tile the compiler refuses (shared memory) is skipped, said
        benchmark.log(f"    tile {tile} {settings}: {type(error).__name__}: {str(error)[:120]}")
        return None


def rows_for(shape: str, ms, bandwidth: float, variants=VARIANTS, tiles=TILES) -> list[dict]:
    rows = []
    for name, (n, k) in benchmark.layer_matrices(shape).items():
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        packed = {kind: quantize(w, kind) for kind in ("int8", "int4")}
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            base = dict(shape=shape, matrix=name, n=n, k=k, m=m)
            for kind, weight in (("fp16", w), ("int8", packed["int8"]), ("int4", packed["int4"])):
                nbytes = weight.nbytes if kind != "fp16" else w.numel() * 2
                us = _time(weight, x, nbytes)
                if us is not None:
                    rows.append(dict(base, kind=kind, variant="default", tile=None, us=us,
                                     pct=100 * nbytes / bandwidth * 1e6 / us))
            qw, nbytes = packed["int4"], packed["int4"].nbytes
            for operands, codes in variants:
                for tile in tiles:
                    us = _time(qw, x, nbytes, tile, int4_operands=operands, int4_codes=codes)
                    if us is not None:
                        rows.append(dict(base, kind="int4", variant=f"{operands}/{codes}", tile=tile, us=us,
                                         pct=100 * nbytes / bandwidth * 1e6 / us))
            best = min((r for r in rows if r["matrix"] == name and r["m"] == m and r["shape"] == shape
                        and r["kind"] == "int4"), key=lambda r: r["us"])
            benchmark.log(f"  {shape} {name} {n}x{k} m{m}: best int4 {best['variant']} {best['tile']} "
                          f"{best['us']:.1f} us ({best['pct']:.0f}% of floor)")
        del w, packed
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bandwidth = benchmark.copy_bandwidth()
    out = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(), torch=torch.__version__,
               commit=os.environ.get("EDGELLM_COMMIT", "unknown"), copy_TBps=bandwidth / 1e12, rows=[])
    for shape in args.shape:
        out["rows"] += rows_for(shape, args.rows, bandwidth)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    print(f"\n{out['device']}  torch {out['torch']}  commit {out['commit']}  copy {out['copy_TBps']:.2f} TB/s")
    print(f"{'shape':13s} {'matrix':7s} {'n x k':12s} m   {'fp16 us':>8s} {'int8 us':>8s} {'int4 us':>8s} "
          f"{'best int4':>9s} (% floor) variant, tile")
    keys = dict.fromkeys((r["shape"], r["matrix"], r["m"]) for r in out["rows"])
    for shape, matrix, m in keys:
        mine = [r for r in out["rows"] if (r["shape"], r["matrix"], r["m"]) == (shape, matrix, m)]
        default = {r["kind"]: r for r in mine if r["variant"] == "default"}
        best = min((r for r in mine if r["kind"] == "int4"), key=lambda r: r["us"])
        us = {kind: f"{default[kind]['us']:8.1f}" if kind in default else f"{'-':>8s}" for kind in ("fp16", "int8", "int4")}
        print(f"{shape:13s} {matrix:7s} {best['n']:5d}x{best['k']:<6d} {m:<3d} {us['fp16']} {us['int8']} {us['int4']} "
              f"{best['us']:9.1f} ({best['pct']:3.0f}%)  {best['variant']}, {best['tile']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
