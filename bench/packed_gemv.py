"""The GEMV's tensor-core path over packed weights (int4: kernels/gemv_weights.py `_int4_dots`; int8:
kernels/gemv.py) at 1, 16 and 64 rows, variant by variant, on a shape's layer matrices (default: the
Llama-3.2-1B and Llama-3.1-8B shapes), each timed in
a CUDA graph over copies that do not fit the L2 (bench/kernels.py `streamed_us`), against its packed
bytes at copy bandwidth and against fp16 and int8 through their default tiles in the same run.

Variants: the dots' operand order (RunSettings.packed_operands: x W^T with the rows first, or W x^T with
the unpacked weights first), how codes become floats (int4_codes: float32 bits, halves in PTX, 16-bit
words in PTX; byte_codes: Triton's ops or PTX), each over a few (BLOCK_N, BLOCK_K, warps, stages) tiles,
whole and with K split (kernels/split_k.py) where the tiles alone leave SMs idle; one row also on the
tensor cores (x padded to 16 rows) beside the CUDA-core tiles.

Run on a CUDA GPU:  python bench/packed_gemv.py [--shape llama-3.2-1b llama-3.1-8b] [--rows 1 16 64] [--prefill 1024] --json out.json
(--prefill: also each matrix at a 1024-token prefill: fp16 cuBLAS, int4 dequantized + cuBLAS, int4 read packed)
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
from edgellm.kernels.split_k import auto_splits  # noqa: E402
from edgellm.quant import quantize  # noqa: E402
from kernels import streamed_us  # noqa: E402  (bench/kernels.py)

# Tensor-core candidates: (kind, dots' operands, codes) -> tiles (BLOCK_N, BLOCK_K, warps, stages); each is
# timed whole and, where its tiles leave SMs idle, with K split as EDGELLM_GEMV_SPLIT=auto would (split_for).
# bench/sass_gemv.py chose these: wider tiles spread a K step's fixed work (x, addresses, masks) over more weights.
INT4_TILES = [(64, 128, 4, 3), (128, 128, 4, 3), (256, 128, 8, 3)]
INT8_TILES = [(32, 512, 4, 4), (64, 256, 4, 4), (128, 256, 8, 3)]
VARIANTS = {**{("int4", operands, codes): INT4_TILES for operands in ("rows", "weights")
               for codes in ("f32", "ptx", "words-ptx")},
            ("int8", "rows", "bits"): INT8_TILES, ("int8", "rows", "ptx"): INT8_TILES,
            ("int8", "weights", "bits"): INT8_TILES[1:2], ("fp8", "rows", "ptx"): INT8_TILES}
# One row (batch 1): the CUDA-core tiles (gemv row_fma), and the tensor-core path with x padded to 16 rows
ROW_TILES = [(4, 512, 2, 3), (4, 1024, 4, 3), (8, 512, 4, 3), (16, 256, 2, 3)]
ROW_VARIANTS = {("int4", "rows", "f32"): ROW_TILES, ("int8", "rows", "bits"): ROW_TILES,
                ("fp8", "rows", "ptx"): ROW_TILES[:2]}
ONE_ROW_DOTS = {("int4", "weights", "ptx"): INT4_TILES[:2], ("int4", "rows", "ptx"): INT4_TILES[:2],
                ("int4", "weights", "words-ptx"): INT4_TILES, ("int4", "rows", "words-ptx"): INT4_TILES,
                ("int8", "rows", "ptx"): INT8_TILES[:2]}


CODES_SETTING = {"int4": "int4_codes", "int8": "byte_codes", "fp8": "byte_codes"}


def split_for(n: int, k: int, tile, sms: int) -> int:
    """The split RunSettings.gemv_split "auto" would give this matrix and tile (kernels/split_k.py)."""
    return auto_splits(-(-n // tile[0]), k, tile[1], sms)


def _copies(w, nbytes: int) -> list:
    """As many copies of a weight as bench/kernels.py `streamed_us` cycles (so none stays in the L2), made
    once for all the variants timed on it."""
    sets = max(2, min(32, -(-256 * 2 ** 20 // nbytes)))
    return [w.clone() if isinstance(w, torch.Tensor) else dataclasses.replace(w, data=w.data.clone())
            for _ in range(sets)]


def _time(copies: list, x, nbytes: int, tile=None, row_fma=None, **settings) -> float | None:
    def fresh(i):
        def call(weight=copies[i % len(copies)]):
            with run_with(**settings):
                return gemv.gemv(x, weight, tile=tile, row_fma=row_fma)
        return call
    try:
        return streamed_us(fresh, nbytes)
    except Exception as error:  # noqa: BLE001 - a tile the compiler refuses (shared memory) is skipped, said
        benchmark.log(f"    tile {tile} {settings}: {type(error).__name__}: {str(error)[:120]}")
        return None


def rows_for(shape: str, ms, bandwidth: float, variants=VARIANTS, prefill: int = 1024, save=None) -> list[dict]:
    """Every candidate's rows on the shape's matrices; save(rows so far) after each matrix (a run cut short
    keeps what it timed)."""
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, (n, k) in benchmark.layer_matrices(shape).items():
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        weights = {"fp16": w, **{kind: quantize(w, kind) for kind in ("int8", "int4", "fp8")}}
        nbytes = {kind: w.numel() * 2 if kind == "fp16" else qw.nbytes for kind, qw in weights.items()}
        copies = {kind: _copies(qw, nbytes[kind]) for kind, qw in weights.items()}
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            base = dict(shape=shape, matrix=name, n=n, k=k, m=m)
            timed = [(kind, "default", None, None, {}) for kind in weights]
            if m == 1:
                timed += [(kind, f"fma {operands}/{codes}", tile, True, {CODES_SETTING[kind]: codes})
                          for (kind, operands, codes), tiles in ROW_VARIANTS.items() for tile in tiles]
            for (kind, operands, codes), tiles in (ONE_ROW_DOTS if m == 1 else variants).items():
                settings = dict(packed_operands=operands, **{CODES_SETTING[kind]: codes})
                for tile in tiles:
                    split = split_for(n, k, tile, sms)
                    timed += [(kind, f"{operands}/{codes}", tile + (s,) if s > 1 else tile, False, settings)
                              for s in sorted({1, split})]
            for kind, variant, tile, row_fma, settings in timed:
                us = _time(copies[kind], x, nbytes[kind], tile, row_fma, **settings)
                if us is not None:
                    rows.append(dict(base, kind=kind, variant=variant, tile=tile, us=us,
                                     pct=100 * nbytes[kind] / bandwidth * 1e6 / us))
            for kind in ("int8", "int4", "fp8"):
                best = min((r for r in rows if (r["shape"], r["matrix"], r["m"], r["kind"]) == (shape, name, m, kind)),
                           key=lambda r: r["us"])
                benchmark.log(f"  {shape} {name} {n}x{k} m{m}: best {kind} {best['variant']} {best['tile']} "
                              f"{best['us']:.1f} us ({best['pct']:.0f}% of floor)")
        rows += prefill_rows(shape, name, w, weights["int4"], copies, prefill)
        if save is not None:
            save(rows)
        del w, weights, copies
        torch.cuda.empty_cache()
    return rows


def prefill_rows(shape: str, name: str, w, qw, copies: dict, m: int) -> list[dict]:
    """A prefill's m tokens through the matrix: fp16 cuBLAS, int4 dequantized then cuBLAS (the default
    path), and kernels/matmul.py reading int4 packed (EDGELLM_PACKED_PREFILL=gemm) with each codes mode;
    TFLOP/s from 2 m n k."""
    import torch.nn.functional as F

    from edgellm.kernels import dequantize as dequantize_kernel, matmul

    if not m:
        return []
    n, k = w.shape
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    cases = [("fp16 cuBLAS", copies["fp16"], lambda weight: F.linear(x, weight), {}),
             ("int4 dequantized + cuBLAS", copies["int4"],
              lambda weight: F.linear(x, dequantize_kernel.dequantize(weight, torch.float16)), {})]
    cases += [(f"int4 matmul {codes}", copies["int4"], lambda weight: matmul.matmul(x, weight), dict(int4_codes=codes))
              for codes in ("f32", "ptx")]
    rows = []
    for variant, weights, call, settings in cases:
        def fresh(i, weights=weights, call=call, settings=settings):
            def run(weight=weights[i % len(weights)]):
                with run_with(**settings):
                    return call(weight)
            return run
        try:
            us = streamed_us(fresh, qw.nbytes)
        except Exception as error:  # noqa: BLE001 - reported, skipped
            benchmark.log(f"    prefill {variant}: {type(error).__name__}: {str(error)[:120]}")
            continue
        rows.append(dict(shape=shape, matrix=name, n=n, k=k, m=m, kind="prefill", variant=variant, tile=None, us=us,
                         tflops=2 * m * n * k / us / 1e6))
        benchmark.log(f"  {shape} {name} prefill {m} tokens, {variant}: {us:.1f} us ({rows[-1]['tflops']:.0f} TFLOP/s)")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", default=["llama-3.2-1b", "llama-3.1-8b"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prefill", type=int, default=1024, help="tokens of the prefill comparison (0: none)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bandwidth = benchmark.copy_bandwidth()
    out = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(), torch=torch.__version__,
               commit=os.environ.get("EDGELLM_COMMIT", "unknown"), copy_TBps=bandwidth / 1e12, rows=[])
    def save(rows_so_far):
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(dict(out, rows=out["rows"] + rows_so_far), indent=1))

    for shape in args.shape:
        out["rows"] += rows_for(shape, args.rows, bandwidth, prefill=args.prefill, save=save)
    save([])
    print(f"\n{out['device']}  torch {out['torch']}  commit {out['commit']}  copy {out['copy_TBps']:.2f} TB/s")
    print(f"{'shape':13s} {'matrix':7s} {'n x k':12s} {'m':3s} {'kind':5s} {'fp16 us':>8s} {'default':>8s} "
          f"{'best us':>8s} {'% floor':>7s} {'x fp16':>6s}  best variant, tile")
    decode = [r for r in out["rows"] if r["kind"] != "prefill"]
    keys = dict.fromkeys((r["shape"], r["matrix"], r["m"]) for r in decode)
    for shape, matrix, m in keys:
        mine = [r for r in decode if (r["shape"], r["matrix"], r["m"]) == (shape, matrix, m)]
        default = {r["kind"]: r for r in mine if r["variant"] == "default"}
        for kind in ("int8", "int4", "fp8"):
            best = min((r for r in mine if r["kind"] == kind), key=lambda r: r["us"])
            fp16 = default["fp16"]["us"] if "fp16" in default else float("nan")
            print(f"{shape:13s} {matrix:7s} {best['n']:5d}x{best['k']:<6d} {m:<3d} {kind:5s} {fp16:8.1f} "
                  f"{default[kind]['us'] if kind in default else float('nan'):8.1f} {best['us']:8.1f} {best['pct']:6.0f}% "
                  f"{fp16 / best['us']:6.2f}  {best['variant']}, {best['tile']}")
    print_choices(decode)
    for r in (r for r in out["rows"] if r["kind"] == "prefill"):
        print(f"{r['shape']:13s} {r['matrix']:7s} {r['n']:5d}x{r['k']:<6d} prefill {r['m']} tokens  {r['variant']:26s} "
              f"{r['us']:8.1f} us  {r['tflops']:4.0f} TFLOP/s")
    return 0


def print_choices(rows: list[dict]) -> None:
    """For each format and row count, the candidates (variant, tile; split-K folded in as "auto" where it
    was timed) closest to each matrix's best across all matrices: the geometric mean of their time over
    the best, what a default must be chosen by."""
    import math

    best = {}
    for r in rows:
        key = (r["shape"], r["matrix"], r["m"], r["kind"])
        best[key] = min(best.get(key, math.inf), r["us"])
    scores: dict = {}
    for r in rows:
        if r["kind"] == "fp16":
            continue
        tile = tuple(r["tile"][:4]) if r["tile"] else None
        key = (r["kind"], r["m"], r["variant"], tile)
        entry = scores.setdefault(key, {})
        matrix = (r["shape"], r["matrix"])
        ratio = r["us"] / best[(r["shape"], r["matrix"], r["m"], r["kind"])]
        entry[matrix] = min(entry.get(matrix, math.inf), ratio)  # (split where it helped: what "auto" would pick)
    print("\ncandidates by the geometric mean of time / best over the matrices (1.00: best on every one)")
    for kind, m in sorted({(k[0], k[1]) for k in scores}):
        ranked = []
        for (k, mm, variant, tile), entry in scores.items():
            if (k, mm) != (kind, m):
                continue
            ratios = list(entry.values())
            ranked.append((math.exp(sum(map(math.log, ratios)) / len(ratios)), len(ratios), variant, tile))
        for mean, count, variant, tile in sorted(ranked)[:3]:
            print(f"  {kind:5s} m{m:<3d} {mean:5.2f}  over {count:2d} matrices  {variant}, {tile}")


if __name__ == "__main__":
    raise SystemExit(main())
