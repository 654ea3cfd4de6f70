"""Prefill attention of a short chunk after a long cached prefix (a KV hit), by the number of key
splits: the attention kernel and the merge of its parts, each timed in a CUDA graph (triton's
do_bench_cudagraph), Llama-3.2-1B heads.

Run on a CUDA GPU:  python bench/prefill_splits.py [--new 48] [--cached 1984]
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
    for splits in args.splits:
        def run(splits=splits):
            attention.prefill_attention(q, kc, vc, zeros, start, qlen, scale, num_splits=splits)
        out = attention.prefill_attention(q, kc, vc, zeros, start, qlen, scale, num_splits=splits)
        err = (out.float() - reference.float()).abs().max().item()
        us = triton.testing.do_bench_cudagraph(run, rep=50) * 1e3
        print(f"  splits {splits:3d}: {us:7.1f} us   (max |diff| vs one split {err:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
