"""Prefill attention against torch SDPA (each of its flash, cuDNN and memory-efficient backends that
takes the shape; the fastest is the baseline) at several prompt lengths, with a sweep of the Triton
kernel's tiles: (BLOCK_M, BLOCK_N, warps, stages) and whether a program's rows pack every query head
of a KV group (each K/V tile loaded once per group).

Llama-3.2-1B attention shape by default (32 query heads, 8 KV heads, head_dim 64), batch 1, causal,
fp16; the K/V in edgellm's cache layout [slot, kv_head, position, head_dim] (SDPA reads the same
tensors as [batch, kv_head, position, head_dim]). Time: triton.testing.do_bench over a CUDA graph of
`--calls` calls (bench/kernels.py's graph_us), per call; TFLOP/s counts the causal half (2 * 2 * s^2 / 2 * d * heads).
For an A/B against an older tree, copy this script into a `git archive` of it and run both.

Run on a CUDA GPU:  python bench/prefill_attention.py [--lengths 512 1024 4096 8192] [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernels import graph_us  # noqa: E402
from edgellm.kernels import attention  # noqa: E402


def sdpa_backends(qt, k, v, scale):
    """{name: fn} for each SDPA backend that takes this shape here (flash, cuDNN, memory-efficient)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    found = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def fn(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, k, v, is_causal=True, scale=scale, enable_gqa=True)
        try:
            fn()
            found[name] = fn
        except RuntimeError:
            pass
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 4096, 8192])
    parser.add_argument("--heads", type=int, nargs=3, default=[32, 8, 64], metavar=("HQ", "HKV", "D"))
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="time every tile of --block-m x --block-n x ...")
    parser.add_argument("--block-m", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--pack", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    hq, hkv, d = args.heads
    scale = d ** -0.5
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}  heads {hq}/{hkv}  head_dim {d}  fp16, causal, batch 1", flush=True)
    results = []
    for s in args.lengths:
        gen = torch.Generator(device=dev).manual_seed(s)
        k, v = (torch.randn(1, hkv, s, d, device=dev, dtype=torch.float16, generator=gen) for _ in range(2))
        q = torch.randn(1, s, hq, d, device=dev, dtype=torch.float16, generator=gen)
        qt = q.transpose(1, 2).contiguous()  # SDPA's layout [batch, heads, position, head_dim]
        zeros = torch.zeros(1, device=dev, dtype=torch.int32)
        qlen = torch.full((1,), s, device=dev, dtype=torch.int32)
        flops = 2 * 2 * s * s * d * hq / 2
        backends = sdpa_backends(qt, k, v, scale)
        want = next(iter(backends.values()))().transpose(1, 2).float()
        timings = {name: us for name, fn in backends.items() if (us := graph_us(fn, args.calls)) is not None}
        print(f"s={s:<5d} SDPA " + ", ".join(f"{name} {us:.1f} us ({flops / us / 1e6:.0f} TFLOP/s)"
                                             for name, us in timings.items()), flush=True)
        sdpa_name = min(timings, key=timings.get)  # the baseline: the fastest backend
        sdpa_us = timings[sdpa_name]
        sdpa_name = f"SDPA {sdpa_name}"
        default_us = graph_us(lambda: attention.prefill_attention(q, k, v, zeros, zeros, qlen, scale), args.calls)
        err = (attention.prefill_attention(q, k, v, zeros, zeros, qlen, scale).float() - want).abs().max().item()
        row = dict(length=s, sdpa=sdpa_name, sdpa_us=sdpa_us, sdpa_backends=timings, default_us=default_us, default_err=err)
        print(f"s={s:<5d} {sdpa_name} {sdpa_us:8.1f} us ({flops / sdpa_us / 1e6:5.0f} TFLOP/s)   Triton default "
              f"{default_us:8.1f} us ({flops / default_us / 1e6:5.0f} TFLOP/s, {sdpa_us / default_us:4.2f}x SDPA, "
              f"max err {err:.2g})", flush=True)
        sweep = []
        if args.sweep:
            for bm, bn, warps, stages, pack in itertools.product(args.block_m, args.block_n, args.warps,
                                                                  args.stages, args.pack):
                tile = (bm, bn, warps, stages)
                def fn(tile=tile, pack=pack):
                    return attention.prefill_attention(q, k, v, zeros, zeros, qlen, scale, tile=tile, num_splits=1,
                                                       pack=bool(pack))
                try:
                    e = (fn().float() - want).abs().max().item()
                    us = graph_us(fn, args.calls)
                    if us is None:
                        raise RuntimeError("CUDA graph capture failed")
                except Exception as exc:  # noqa: BLE001 - a tile that does not fit is reported, the sweep goes on
                    print(f"  {tile} pack={pack} FAILED {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                sweep.append(dict(tile=tile, pack=pack, us=us, err=e))
            sweep.sort(key=lambda r: r["us"])
            for r in sweep[:args.top]:
                print(f"  tile {r['tile']} pack={r['pack']}  {r['us']:8.1f} us  {flops / r['us'] / 1e6:5.0f} TFLOP/s  "
                      f"{sdpa_us / r['us']:4.2f}x SDPA  max err {r['err']:.2g}", flush=True)
        row["sweep"] = sweep
        results.append(row)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
