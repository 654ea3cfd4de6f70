"""Reduced vocabularies on a CUDA GPU (issue 15): decode tokens/s at batch 1 and 16 on the
Llama-3.2-1B shape (random weights) with the full vocabulary (128256) and maps of 8k, 16k and 32k ids,
each run in the same process; and the sampling kernel's time at each vocabulary size (greedy and
top-k 50 + top-p 0.9), against reading the logits once (the floor).

Run:  python bench/vocab.py --json bench/results/vocab.json
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import decode_parser  # noqa: E402
from edgellm import benchmark  # noqa: E402
from edgellm.engine.vocab_map import save_vocab_map  # noqa: E402
from edgellm.kernels import ops  # noqa: E402

SIZES = (0, 8192, 16384, 32768)  # 0: the full vocabulary


def sampling_us(vocab: int, batch: int, top: bool, bandwidth: float) -> tuple[float, float]:
    import triton.testing

    logits = torch.randn(batch, vocab, device="cuda")
    temperature = torch.full((batch,), 0.7 if top else 0.0, device="cuda")
    top_k = torch.full((batch,), 50 if top else 1, dtype=torch.int32, device="cuda")
    top_p = torch.full((batch,), 0.9 if top else 1.0, device="cuda")
    seeds = torch.zeros(batch, dtype=torch.int64, device="cuda")
    us = triton.testing.do_bench(lambda: ops.sample(logits, temperature, top_k, top_p, seeds, seeds),
                                 return_mode="median") * 1e3
    return us, logits.numel() * 4 / bandwidth * 1e6


def main() -> int:
    parser = decode_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    model_dir = benchmark.random_model_dir(args.shape, "/tmp/edgellm-bench")
    config = json.loads((model_dir / "config.json").read_text())
    vocab, eos = config["vocab_size"], config.get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    bandwidth = benchmark.copy_bandwidth()
    rows = []
    for size in SIZES:
        map_dir = None
        if size:
            map_dir = Path(tempfile.mkdtemp(prefix=f"map{size}-"))
            # Random weights: which ids are kept does not matter to speed; spread them, EOS included.
            step = vocab // size
            ids = set(range(0, step * size, step)[:size - len(eos)]) | eos
            filler = (i for i in range(vocab) if i not in ids)
            while len(ids) < size:  # EOS fell on the grid
                ids.add(next(filler))
            save_vocab_map(map_dir, torch.tensor(sorted(ids)), {"bench": True})
        runner = benchmark.make_runner(model_dir, batches=args.batch, isl=128, osl=args.osl, ttft_lens=[],
                                       vocab_map=map_dir)
        for batch in args.batch:
            row = benchmark.bench_decode(runner, batch, 128, args.osl, args.iterations, bandwidth)
            greedy_us, floor_us = sampling_us(size or vocab, batch, False, bandwidth)
            top_us, _ = sampling_us(size or vocab, batch, True, bandwidth)
            rows.append(dict(vocab=size or vocab, batch=batch, tokens_per_s=row["tokens_per_s"],
                             ms_per_step=row["ms_per_step"], floor_ms=row["floor_ms"], pct_of_floor=row["pct_of_floor"],
                             sample_greedy_us=greedy_us, sample_top_us=top_us, logits_read_us=floor_us))
            benchmark.log(f"{rows[-1]}")
        del runner
        torch.cuda.empty_cache()
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["vocab"] == vocab}
    print(f"\n{args.shape}  copy {bandwidth / 1e12:.2f} TB/s")
    print(f"{'vocab':>7} {'batch':>5} {'tok/s':>8} {'x full':>6} {'ms/step':>8} {'% floor':>7} "
          f"{'greedy us':>9} {'top-p us':>8} {'read us':>7}")
    for r in rows:
        print(f"{r['vocab']:>7} {r['batch']:>5} {r['tokens_per_s']:8.0f} {r['tokens_per_s'] / base[r['batch']]:6.2f} "
              f"{r['ms_per_step']:8.3f} {r['pct_of_floor']:6.0f}% {r['sample_greedy_us']:9.1f} "
              f"{r['sample_top_us']:8.1f} {r['logits_read_us']:7.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
                                         "commit": os.environ.get("EDGELLM_COMMIT", ""), "shape": args.shape,
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
