"""The launch cost between decode kernels: a chain of one decode step's linear layers (qkv, o,
gate_up, down per layer, each layer's weights distinct, every kernel reading the previous one's
output), replayed from a CUDA graph, with cuBLAS, with the Triton GEMV, and with the Triton GEMV under
programmatic dependent launch (PDL, kernels/_triton.py): releasing the next kernel after the loads
(today) or right after the wait (pdl "early"), with and without each GEMV prefetching its weight
rows towards L2 before it waits (gemv_prefetch): the kernels' RunSettings (kernels/dispatch.py), which
EDGELLM_PDL and EDGELLM_GEMV_PREFETCH set for a runner. Floor = weight bytes / copy bandwidth.

Run on a CUDA GPU:  python bench/chain.py [--json bench/results/chain.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm.benchmark import SHAPES, copy_bandwidth  # noqa: E402
from edgellm.kernels import gemv  # noqa: E402
from edgellm.kernels.dispatch import run_with  # noqa: E402

VARIANTS = {  # name: (kernels, RunSettings.pdl, RunSettings.gemv_prefetch: bytes of each weight row before the wait)
    "cublas": ("cublas", "off", 0),
    "triton": ("triton", "off", 0),
    "triton pdl": ("triton", "on", 0),
    "pdl prefetch 4K": ("triton", "on", 4096),
    "pdl early": ("triton", "early", 0),
    "early prefetch 1K": ("triton", "early", 1024),
    "early prefetch 4K": ("triton", "early", 4096),
    "early prefetch 16K": ("triton", "early", 16384),
}


def layer_weights(shape: dict, layers: int):
    h, i = shape["hidden_size"], shape["intermediate_size"]
    d = shape["hidden_size"] // shape["num_attention_heads"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * d
    def w(n, k):
        return torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    return [dict(qkv=w(qkv, h), o=w(h, shape["num_attention_heads"] * d), gate_up=w(2 * i, h), down=w(h, i)) for _ in range(layers)]


def chain(kind: str, weights, x: torch.Tensor, tile=None):
    h = x.shape[-1]
    for lw in weights:
        q_size = lw["o"].shape[1]
        i = lw["down"].shape[1]
        if kind == "cublas":
            qkv = F.linear(x, lw["qkv"])
            x = F.linear(F.linear(F.linear(qkv[:, :q_size], lw["o"])[:, :h], lw["gate_up"])[:, :i], lw["down"])
        else:
            qkv = gemv.gemv(x, lw["qkv"], tile=tile)
            x = gemv.gemv(gemv.gemv(gemv.gemv(qkv[:, :q_size], lw["o"], tile=tile), lw["gate_up"], tile=tile)[:, :i],
                          lw["down"], tile=tile)
    return x


def time_graph(fn, replays: int = 50) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama-3.2-1b"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--json", default=None)
    parser.add_argument("--tiles", nargs="*", default=[], metavar="N,K,WARPS,STAGES",
                        help="multi-row tiles to sweep (rows > 1), each under PDL with release after the loads")
    parser.add_argument("--variants", nargs="*", default=None, help="the named variants to run (default: all)")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    results = []
    for name in args.shapes:
        shape = SHAPES[name]
        weights = layer_weights(shape, shape["num_hidden_layers"])
        nbytes = sum(t.numel() * 2 for lw in weights for t in lw.values())
        floor_us = nbytes / bandwidth * 1e6
        for rows in args.rows:
            x = torch.randn(rows, shape["hidden_size"], device="cuda", dtype=torch.float16)
            reference = None
            runs = [(name, spec, None) for name, spec in VARIANTS.items() if args.variants is None or name in args.variants]
            if rows > 1:
                runs += [(f"tile {t}", ("triton", "on", 0), tuple(int(v) for v in t.split(","))) for t in args.tiles]
            for variant, (kind, pdl, prefetch), tile in runs:
                try:
                    with run_with(pdl=pdl, gemv_prefetch=prefetch):
                        out = chain(kind, weights, x, tile)
                        us = time_graph(lambda w=weights: chain(kind, w, x, tile))
                    error = None
                except Exception as exc:  # noqa: BLE001 - report the variant as failed, go on
                    us, out, error = None, None, f"{type(exc).__name__}: {str(exc)[:200]}"
                if kind == "triton" and out is not None:
                    reference = out if reference is None else reference
                    same = torch.equal(out, reference)
                else:
                    same = None
                row = dict(shape=name, rows=rows, variant=variant, us=us, floor_us=floor_us,
                           layers=len(weights), same_as_triton=same, error=error)
                results.append(row)
                if us is None:
                    print(f"{name:<14s} m={rows:<3d} {variant:<18s} FAILED {error}", flush=True)
                else:
                    print(f"{name:<14s} m={rows:<3d} {variant:<18s} {us:8.1f} us  {us / len(weights):6.2f} us/layer  "
                          f"{floor_us / us:5.0%} of floor ({floor_us:.1f} us){'' if same is None else '  same=' + str(same)}",
                          flush=True)
        del weights
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(bandwidth=bandwidth, results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
