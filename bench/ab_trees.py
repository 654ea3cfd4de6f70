"""Two trees of edgellm side by side in one call: `edgellm bench` (decode tokens/s per batch size, TTFT)
for each tree, alternating A, B, A, B ... so that drift of the machine falls on both, then the
medians of each figure and B / A. A is an older tree (e.g. `git archive <commit> edgellm | tar x -C
.ab/prev`), B this checkout; each run is a process of its own with that tree first on PYTHONPATH.

Run on a CUDA GPU:  python bench/ab_trees.py --a .ab/prev [--shapes llama-3.2-1b smollm2-135m]
                    [--batch 1 16] [--ttft 128 1024] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def bench(tree: Path, shape: str, args) -> dict:
    """One `edgellm bench` run of `tree`: its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", "edgellm.cli", "bench", "--shape", shape, "--batch", *map(str, args.batch),
                   "--ttft", *map(str, args.ttft), "--osl", str(args.osl), "--iterations", str(args.iterations),
                   "--cache-dir", args.cache_dir, "--json", out.name]
        env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, cwd=tree)
        return json.loads(Path(out.name).read_text())


def figures(result: dict) -> dict[str, float]:
    """{figure name: value} of one run: decode tok/s per batch (the kernel chain's rows) and TTFT ms."""
    out = {f"decode b{r['batch']} tok/s": r["tokens_per_s"] for r in result["decode"] if r.get("mode", "chain") == "chain"}
    out.update({f"TTFT {r['prompt_len']} ms": r["ttft_ms"] for r in result["ttft"]})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="the older tree (a directory holding edgellm/)")
    parser.add_argument("--b", type=Path, default=HERE, help="the newer tree (default: this checkout)")
    parser.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "smollm2-135m"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--ttft", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--osl", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="A, B pairs per shape")
    parser.add_argument("--cache-dir", default="/tmp/edgellm-bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    runs: dict = {}
    for shape in args.shapes:
        for round_ in range(args.rounds):
            for name, tree in trees.items():
                result = figures(bench(tree, shape, args))
                print(f"{shape} round {round_ + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()),
                      flush=True)
                for key, value in result.items():
                    runs.setdefault(shape, {}).setdefault(key, {}).setdefault(name, []).append(value)
    print(f"\nA = {trees['A']}, B = {trees['B']}; medians of {args.rounds} runs each (each run: median of "
          f"{args.iterations})")
    print(f"{'shape':14s} {'figure':18s} {'A':>10s} {'B':>10s} {'B / A':>7s}")
    table = []
    for shape, keys in runs.items():
        for key, by_tree in keys.items():
            a, b = (statistics.median(by_tree[n]) for n in ("A", "B"))
            table.append(dict(shape=shape, figure=key, a=a, b=b, ratio=b / a, runs=by_tree))
            print(f"{shape:14s} {key:18s} {a:10.2f} {b:10.2f} {b / a:7.3f}")
    if args.json:
        args.json.write_text(json.dumps(dict(a=str(trees["A"]), b=str(trees["B"]), rows=table), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
