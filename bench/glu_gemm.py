"""A long prompt's gate/up projection with SiLU(gate) * up in its epilogue (one Triton GEMM, two
accumulators sharing each x tile) against cuBLAS's GEMM followed by the glu kernel, and a plain
Triton GEMM against cuBLAS (how close Triton's tiles come on their own). Llama-3.2-1B shape: x
[M, 2048] @ W_gate_up^T [2048, 2 x 8192], fp16. Time: do_bench over a CUDA graph of 10 calls.

Run on a CUDA GPU:  python bench/glu_gemm.py [--rows 1024 2048] [--json out.json]
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

from bench.kernels import graph_us  # noqa: E402
from edgellm.kernels.glu import gate_activation, glu as glu_op  # noqa: E402


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, y_ptr, m, n, k, s_xm, s_wn, s_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, GLU: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(m, BLOCK_M)
    tiles_n = tl.cdiv(n, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < m
    col_ok = cols < n
    x_ptrs = x_ptr + rows[:, None] * s_xm + ks[None, :]
    g_ptrs = w_ptr + cols[None, :].to(tl.int64) * s_wn + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GLU:
        u_ptrs = g_ptrs + n * s_wn
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, k, BLOCK_K, num_stages=STAGES):
        k_ok = k0 + ks < k
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, g, acc)
        if GLU:
            u = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_u = tl.dot(a, u, acc_u)
            u_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
    out = acc.to(y_ptr.dtype.element_ty)
    if GLU:  # rounded as the GEMM's output would be, then glu's arithmetic
        out = gate_activation(out, False) * acc_u.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * s_ym + cols[None, :], out, mask=row_ok[:, None] & col_ok[None, :])


def triton_gemm(x, w, glu, cfg):
    bm, bn, bk, group, warps, stages = cfg
    m, k = x.shape
    n = w.shape[0] // 2 if glu else w.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _gemm_kernel[grid](x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                       GROUP_M=group, GLU=glu, STAGES=stages, num_warps=warps)
    return y


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--block-m", type=int, nargs="+", default=[128])
    parser.add_argument("--block-n", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--block-k", type=int, nargs="+", default=[64])
    parser.add_argument("--group-m", type=int, nargs="+", default=[8])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dev = torch.device("cuda")
    w = torch.randn(2 * args.ffn, args.hidden, device=dev, dtype=torch.float16) * 0.02
    results = []
    for m in args.rows:
        x = torch.randn(m, args.hidden, device=dev, dtype=torch.float16)
        flops = 2 * m * args.hidden * 2 * args.ffn
        want = glu_op(F.linear(x, w))
        cublas = graph_us(lambda: F.linear(x, w), 10)
        unfused = graph_us(lambda: glu_op(F.linear(x, w)), 10)
        print(f"m={m}: cuBLAS gate_up {cublas:.1f} us ({flops / cublas / 1e6:.0f} TFLOP/s); + glu {unfused:.1f} us",
              flush=True)
        for glu in (False, True):
            rows = []
            for cfg in itertools.product(args.block_m, args.block_n, args.block_k, args.group_m, args.warps,
                                         args.stages):
                try:
                    got = triton_gemm(x, w, glu, cfg)
                    ref = want if glu else F.linear(x, w)
                    err = (got.float() - ref.float()).abs().max().item()
                    us = graph_us(lambda: triton_gemm(x, w, glu, cfg), 10)
                except Exception as exc:  # noqa: BLE001 - a config that does not fit is reported
                    print(f"  glu={glu} {cfg} FAILED {type(exc).__name__}: {str(exc)[:100]}", flush=True)
                    continue
                rows.append(dict(rows=m, glu=glu, cfg=cfg, us=us, err=err))
            rows.sort(key=lambda r: r["us"])
            base = unfused if glu else cublas
            for r in rows[:args.top]:
                print(f"  {'GLU  ' if glu else 'plain'} (bm, bn, bk, group, warps, stages)={r['cfg']}  {r['us']:7.1f} us  "
                      f"{flops / r['us'] / 1e6:4.0f} TFLOP/s  {base / r['us']:4.2f}x {'cuBLAS + glu' if glu else 'cuBLAS'}"
                      f"  max err {r['err']:.2g}", flush=True)
            results += rows
        results.append(dict(rows=m, cublas_us=cublas, cublas_silu_us=unfused))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
