"""Prefill GEMMs of 16-128 rows (a short prompt's linear layers): cuBLAS against a Triton GEMM that
puts the *weight* rows on the tensor cores' M side ("swap AB": y^T = W x^T), so a 32-128-token
operand takes the MMA's narrow N side without padding to 64, and each program streams a 32-128-row
slice of W once while x (small, L2-resident) is re-read. Optional split-K over `SPLIT` programs a
tile, reduced by the last one to arrive (a counter per tile, reset by that program, so a CUDA graph
can replay it), and PDL (the next kernel launched while this one drains).

Every matrix type of the Llama-3.2-1B shape is timed as a chain of its 16 layers' distinct matrices
replayed from a CUDA graph (so no weight stays in L2 between kernels); floor = bytes / copy bandwidth.

Run on a CUDA GPU:  python bench/skinny_gemm.py [--rows 32 64 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.chain import layer_weights, time_graph  # noqa: E402
from edgellm.benchmark import SHAPES, copy_bandwidth  # noqa: E402
from edgellm.kernels._triton import pdl_release, pdl_wait  # noqa: E402


@triton.jit
def _swap_ab_kernel(x_ptr, w_ptr, y_ptr, part_ptr, count_ptr, m, n, k, s_xm, s_wn, s_ym,
                    BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                    STAGES: tl.constexpr, PDL: tl.constexpr):
    tile = tl.program_id(0)
    part = tl.program_id(1)
    rows = tile * BLOCK_W + tl.arange(0, BLOCK_W)
    toks = tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_K)
    n_ok = rows < n
    t_ok = toks < m
    span = tl.cdiv(tl.cdiv(k, SPLIT), BLOCK_K) * BLOCK_K
    k_lo = part * span
    k_hi = tl.minimum(k, k_lo + span)
    w_base = w_ptr + rows.to(tl.int64)[:, None] * s_wn
    pdl_wait(PDL)
    acc = tl.zeros([BLOCK_W, BLOCK_T], dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
        kk = k0 + cols
        w = tl.load(w_base + kk[None, :], mask=n_ok[:, None] & (kk < k_hi)[None, :], other=0.0)
        xt = tl.load(x_ptr + toks[None, :] * s_xm + kk[:, None], mask=t_ok[None, :] & (kk < k_hi)[:, None], other=0.0)
        acc = tl.dot(w, xt, acc)
    pdl_release(PDL)
    out_ptrs = y_ptr + toks[None, :] * s_ym + rows[:, None]
    mask = n_ok[:, None] & t_ok[None, :]
    if SPLIT == 1:
        tl.store(out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        offs = (part * BLOCK_T + toks[None, :]) * n + rows[:, None]
        tl.store(part_ptr + offs, acc, mask=mask)
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT - 1:  # the last of the tile's parts: sum them all, reset the counter
            total = tl.zeros([BLOCK_W, BLOCK_T], dtype=tl.float32)
            for p in tl.static_range(SPLIT):
                total += tl.load(part_ptr + (p * BLOCK_T + toks[None, :]) * n + rows[:, None], mask=mask, other=0.0)
            tl.store(out_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(count_ptr + tile, 0)


class SwapAB:
    def __init__(self, block_w, block_k, warps, stages, split, pdl):
        self.cfg = (block_w, block_k, warps, stages, split, pdl)
        self.parts = {}
        self.counts = {}

    def __call__(self, x, w):
        block_w, block_k, warps, stages, split, pdl = self.cfg
        m, k = x.shape
        n = w.shape[0]
        block_t = max(16, triton.next_power_of_2(m))
        y = torch.empty(m, n, device=x.device, dtype=x.dtype)
        tiles = triton.cdiv(n, block_w)
        key = (n, block_t)
        if split > 1 and key not in self.parts:
            self.parts[key] = torch.empty(split * block_t * n, device=x.device, dtype=torch.float32)
            self.counts[key] = torch.zeros(tiles, device=x.device, dtype=torch.int32)
        part = self.parts.get(key, y)
        count = self.counts.get(key, y)
        _swap_ab_kernel[(tiles, split)](x, w, y, part, count, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                                        BLOCK_W=block_w, BLOCK_T=block_t, BLOCK_K=block_k, SPLIT=split,
                                        STAGES=stages, PDL=pdl, num_warps=warps, launch_pdl=pdl > 0)
        return y


def cublas(x, w):
    return F.linear(x, w)


def run_chain(fn, mats, x):
    out = None
    for w in mats:
        out = fn(x, w)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.2-1b")
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--matrices", nargs="+", default=["qkv", "o", "gate_up", "down"])
    parser.add_argument("--block-w", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--block-k", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[4])
    parser.add_argument("--stages", type=int, nargs="+", default=[3, 4, 5])
    parser.add_argument("--split", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--pdl", type=int, nargs="+", default=[1])
    parser.add_argument("--top", type=int, default=5, help="configs printed per (matrix, rows)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    shape = SHAPES[args.shape]
    weights = layer_weights(shape, shape["num_hidden_layers"])
    results = []
    best = {}
    for rows in args.rows:
        for name in args.matrices:
            mats = [lw[name] for lw in weights]
            n, k = mats[0].shape
            floor = sum(w.numel() * 2 for w in mats) / bandwidth * 1e6 / len(mats)
            x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
            want = F.linear(x, mats[-1]).float()
            base = time_graph(lambda: run_chain(cublas, mats, x)) / len(mats)
            print(f"m={rows:<4d}{name:<8s} n={n:<6d} k={k:<5d} floor {floor:6.2f} us  cuBLAS {base:6.2f} us "
                  f"({floor / base:4.0%})", flush=True)
            rows_out = []
            for bw, bk, warps, stages, split, pdl in itertools.product(args.block_w, args.block_k, args.warps,
                                                                      args.stages, args.split, args.pdl):
                if split > 1 and k // split < bk:
                    continue
                fn = SwapAB(bw, bk, warps, stages, split, pdl)
                try:
                    got = run_chain(fn, mats, x).float()
                    err = (got - want).abs().max().item()
                    us = time_graph(lambda: run_chain(fn, mats, x)) / len(mats)
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported
                    print(f"  {fn.cfg} FAILED {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                    continue
                rows_out.append(dict(rows=rows, matrix=name, cfg=fn.cfg, us=us, floor=floor, cublas=base, err=err))
            rows_out.sort(key=lambda r: r["us"])
            for r in rows_out[:args.top]:
                print(f"  (bw, bk, warps, stages, split, pdl)={r['cfg']}  {r['us']:6.2f} us  {floor / r['us']:4.0%} "
                      f"of floor  {base / r['us']:4.2f}x cuBLAS  max err {r['err']:.3g}", flush=True)
            if rows_out:
                best[(rows, name)] = rows_out[0]
            results += rows_out
    print("\nbest per (rows, matrix): Triton us / cuBLAS us / floor us")
    for rows in args.rows:
        tri = sum(best[(rows, m)]["us"] for m in args.matrices if (rows, m) in best)
        cub = sum(best[(rows, m)]["cublas"] for m in args.matrices if (rows, m) in best)
        flo = sum(best[(rows, m)]["floor"] for m in args.matrices if (rows, m) in best)
        print(f"m={rows:<4d} a layer: Triton {tri:6.1f} us ({flo / tri:4.0%})  cuBLAS {cub:6.1f} us ({flo / cub:4.0%})  "
              f"floor {flo:6.1f} us")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(bandwidth=bandwidth, results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
