"""Prefill attention of a short chunk after a long cached prefix (a KV hit), by the number of key
splits, with one query head a program or the rows packed (queries x a KV group's heads): the attention
kernel and the merge of its parts, each timed in a CUDA graph (triton's do_bench_cudagraph),
Llama-3.2-1B heads.

Run on a CUDA GPU:  python bench/prefill_splits.py [--new 48] [--cached 1984] [--tiles 64,64,4,2 128,64,8,2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm.kernels import attention  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--cached", type=int, default=1984)
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2, 3, 4, 6, 9, 12, 16])
    parser.add_argument("--tiles", nargs="*", default=["64,64,4,2"],
                        help="BLOCK_M,BLOCK_N,warps,stages of the packed rows (queries x the group's heads)")
    args = parser.parse_args()
    import triton.testing

    hq, hkv, d = 32, 8, 64
    total = args.new + args.cached
    kc = torch.randn(1, hkv, total, d, device="cuda", dtype=torch.float16)
    vc = torch.randn_like(kc)
    q = torch.randn(1, args.new, hq, d, device="cuda", dtype=torch.float16)
    zeros = torch.zeros(1, device="cuda", dtype=torch.int32)
    start = torch.full((1,), args.cached, device="cuda", dtype=torch.int32)
    qlen = torch.full((1,), args.new, device="cuda", dtype=torch.int32)
    scale = d ** -0.5
    reference = attention.prefill_attention(q, kc, vc, zeros, start, qlen, scale, num_splits=1)
    print(f"prefill attention, {args.new} queries after {args.cached} cached keys, {hq} heads / {hkv} KV heads, d {d}")
    configs = [("one head a program", dict(pack=False), splits) for splits in args.splits]
    configs += [(f"packed {tile}", dict(pack=True, tile=tuple(int(v) for v in tile.split(","))), splits)
                for tile in args.tiles for splits in args.splits + [None]]
    configs.append(("default", {}, None))
    for name, options, splits in configs:
        def run(options=options, splits=splits):
            attention.prefill_attention(q, kc, vc, zeros, start, qlen, scale, num_splits=splits, **options)
        out = attention.prefill_attention(q, kc, vc, zeros, start, qlen, scale, num_splits=splits, **options)
        err = (out.float() - reference.float()).abs().max().item()
        us = triton.testing.do_bench_cudagraph(run, rep=50) * 1e3
        print(f"  {name:24s} splits {str(splits or 'auto'):>4s}: {us:7.1f} us   (max |diff| vs one split {err:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
