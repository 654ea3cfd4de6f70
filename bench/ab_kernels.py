"""The kernels whose code changed between two trees, timed side by side in one call: sampling (top-k +
top-p bisection at batch 64 over a 128256 vocabulary) and decode attention (batch 16 over a 4096-token
cache, 32 query heads, 8 KV heads, d=64), each tree in a process of its own, alternating, median of rounds.

Run on a CUDA GPU:  python bench/ab_kernels.py --a .ab/prev [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CASES = r'''
import json, torch, triton.testing
from edgellm.kernels import attention, sampling
torch.manual_seed(0)
out = {}
logits = torch.randn(64, 128256, device="cuda") * 3
ones = lambda v, dtype=torch.float32: torch.full((64,), v, dtype=dtype, device="cuda")
for name, k, p in (("sample top-k 50 + top-p 0.9", 50, 0.9), ("sample top-p 0.9", 0, 0.9), ("sample top-k 50", 50, 1.0)):
    args = (logits, ones(1.0), ones(k, torch.int32), ones(p), torch.arange(64, device="cuda"), ones(3, torch.int64))
    out[name] = triton.testing.do_bench(lambda: sampling.sample(*args), warmup=50, rep=300) * 1e3
k = torch.randn(17, 8, 4096, 64, device="cuda", dtype=torch.float16)
v = torch.randn_like(k)
q = torch.randn(16, 32, 64, device="cuda", dtype=torch.float16)
slots = torch.arange(16, dtype=torch.int32, device="cuda")
lens = torch.full((16,), 4096, dtype=torch.int32, device="cuda")
out["decode attention b16 x 4096"] = triton.testing.do_bench(
    lambda: attention.decode_attention(q, k, v, slots, lens, 0.125), warmup=50, rep=300) * 1e3
print(json.dumps(out))
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True)
    parser.add_argument("--b", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs: dict = {}
    for _ in range(args.rounds):
        for name, tree in (("A", args.a.resolve()), ("B", args.b.resolve())):
            env = {**os.environ, "PYTHONPATH": str(tree)}
            result = json.loads(subprocess.run([sys.executable, "-c", CASES], env=env, cwd=tree, check=True,
                                               capture_output=True, text=True).stdout.splitlines()[-1])
            for case, us in result.items():
                runs.setdefault(case, {}).setdefault(name, []).append(us)
    print(f"{'kernel (us, median of %d)' % args.rounds:36s} {'A':>9s} {'B':>9s} {'B / A':>7s}")
    for case, by in runs.items():
        a, b = statistics.median(by["A"]), statistics.median(by["B"])
        print(f"{case:36s} {a:9.1f} {b:9.1f} {b / a:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
