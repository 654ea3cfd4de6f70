"""The persistent decode kernel (a trial: it lost to the kernel chain) against the chain, in one run.

For each shape (random fp16 weights): the copy-bandwidth floor; teacher-forced decode steps through
both paths with their logits compared; batch-1 decode tokens/s of the runner (the chain, CUDA graphs)
beside the layers' kernel alone (CUDA events) for a few launch configurations (programs per SM, warps,
K chunk), and where a layer's time goes, stage by stage.

Run on a CUDA GPU, from the repository root:  python bench/trials/persistent/bench.py [--shapes ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[2])]

import megakernel  # noqa: E402
from edgellm import benchmark  # noqa: E402
from edgellm.benchmark import log  # noqa: E402
from edgellm.engine.kv_cache import LinearKVCache  # noqa: E402
from edgellm.engine.model import forward_logits  # noqa: E402
from edgellm.kernels import ops  # noqa: E402
from step import persistent_logits  # noqa: E402


def teacher_forced(runner, steps: int) -> float:
    """Largest |persistent - chain| / max|chain| of the logits over `steps` teacher-forced steps
    (each path with its own KV cache, slot 0, positions 0 ...)."""
    cfg, weights, rope = runner.config, runner.weights, runner.rope
    data = runner.kv_cache.data
    caches = [LinearKVCache(num_layers=data.shape[0], max_batch_size=1, num_kv_heads=data.shape[3],
                            capacity=steps + 1, head_dim=data.shape[5], dtype=data.dtype, device=data.device)
              for _ in range(2)]
    plan = megakernel.make_plan(cfg, weights, caches[1].data)
    tokens = torch.randint(10, cfg.vocab_size, (steps,), generator=torch.Generator().manual_seed(0)).tolist()
    slots = torch.zeros(1, dtype=torch.int32, device="cuda")
    q_lens = torch.ones(1, dtype=torch.int32, device="cuda")
    worst = 0.0
    with torch.inference_mode():
        for step, token in enumerate(tokens):
            embeds = weights.embed[token][None, None]
            starts = torch.tensor([step], dtype=torch.int32, device="cuda")
            want = forward_logits(weights, cfg, caches[0], rope, embeds, slots, starts, q_lens)
            got = persistent_logits(plan, weights, cfg, rope, embeds, slots, starts, ops)
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
    if plan.flag.item() or megakernel.stage_counts(plan) != megakernel.expected_counts(plan):
        raise RuntimeError("the persistent kernel's stage counters are wrong (or a wait gave up)")
    return worst


def kernel_us(runner, plan, steps: int = 200) -> float:
    """Microseconds per launch of the layers' kernel alone (position 128 of slot 0)."""
    hidden = runner.weights.embed[5].clone()
    slots = torch.zeros(1, dtype=torch.int32, device="cuda")
    starts = torch.full((1,), 128, dtype=torch.int32, device="cuda")
    cfg = runner.config

    def launch():
        megakernel.persistent_decode(plan, hidden, runner.rope.cos, runner.rope.sin, slots, starts,
                                     cfg.rms_norm_eps, cfg.attention_scale)

    for _ in range(5):
        launch()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        launch()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / steps * 1e3


STAGE_NAMES = ("A qkv", "B attention", "C o", "D gate_up", "E down")


def stage_profile(runner, plan) -> list[dict]:
    """Per stage, averaged over layers 1..: latency (the stage's last tile done minus the previous
    stage's), lag (a program leaving its wait minus the moment the previous stage was done: the
    barrier's cost), work (a program's tiles, mean and max over programs)."""
    layers = runner.config.num_decoder_layers
    prof = torch.zeros(plan.programs, layers, 5, 3, dtype=torch.int64, device="cuda")
    hidden = runner.weights.embed[5].clone()
    slots = torch.zeros(1, dtype=torch.int32, device="cuda")
    starts = torch.full((1,), 128, dtype=torch.int32, device="cuda")
    for _ in range(3):
        megakernel.persistent_decode(plan, hidden, runner.rope.cos, runner.rope.sin, slots, starts,
                                     runner.config.rms_norm_eps, runner.config.attention_scale, profile=prof)
    t = prof.cpu().double() / 1e3  # us
    used = t[..., 2] > 0  # [programs, layers, stages]: the program had tiles there
    rows = []
    for stage in range(5):
        lat, lag, work, worst = [], [], [], []
        for layer in range(1, layers):
            prev_layer, prev_stage = (layer, stage - 1) if stage else (layer - 1, 4)
            ready = t[:, prev_layer, prev_stage, 2][used[:, prev_layer, prev_stage]].max()
            mine = used[:, layer, stage]
            lat.append(t[:, layer, stage, 2][mine].max() - ready)
            lag.append((t[:, layer, stage, 1][mine] - ready).mean())
            spans = t[:, layer, stage, 2][mine] - t[:, layer, stage, 1][mine]
            work.append(spans.mean())
            worst.append(spans.max())
        mean = lambda v: float(sum(v) / len(v))  # noqa: E731
        rows.append(dict(stage=STAGE_NAMES[stage], latency_us=mean(lat), lag_us=mean(lag), work_us=mean(work),
                         work_max_us=mean(worst)))
        log(f"    {STAGE_NAMES[stage]:12s} latency {rows[-1]['latency_us']:6.2f} us  barrier lag "
            f"{rows[-1]['lag_us']:6.2f}  work mean {rows[-1]['work_us']:6.2f} max {rows[-1]['work_max_us']:6.2f}")
    return rows


def one_shape(shape: str, args, bandwidth: float) -> dict:
    model_dir = benchmark.random_model_dir(shape, args.cache_dir)
    runner = benchmark.make_runner(model_dir, batches=[1], isl=args.isl, osl=args.osl, ttft_lens=[])
    why = megakernel.supports(runner.config, runner.weights, runner.dtype)
    if why is not None:
        raise RuntimeError(f"{shape}: the persistent kernel does not run this model ({why})")
    out = dict(shape=shape, floor_ms=benchmark.weight_bytes(runner) / bandwidth * 1e3)
    out["teacher_forced_max_rel_err"] = teacher_forced(runner, args.check_steps)
    log(f"  teacher-forced {args.check_steps} steps: max relative logit error {out['teacher_forced_max_rel_err']:.2e}")
    r = benchmark.bench_decode(runner, 1, args.isl, args.osl, args.iterations, bandwidth)
    out["chain"] = dict(tokens_per_s=r["tokens_per_s"], ms_per_step=r["ms_per_step"], pct_of_floor=r["pct_of_floor"])
    log(f"  chain b1: {r['tokens_per_s']:7.0f} tok/s ({r['pct_of_floor']:.0f}% of the floor)")
    sweep = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for per_sm, warps, chunk in ((1, 8, 8192), (1, 8, 4096), (1, 8, 16384), (1, 4, 4096), (2, 4, 4096)):
        variant = megakernel.make_plan(runner.config, runner.weights, runner.kv_cache.data,
                                       programs=per_sm * sms, chunk=chunk)._replace(warps=warps)
        us = kernel_us(runner, variant)
        compiled = megakernel.last_launch.get("kernel")
        regs, spills = getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None)
        valid = not variant.flag.item() and megakernel.stage_counts(variant) == megakernel.expected_counts(variant)
        sweep.append(dict(programs=per_sm * sms, warps=warps, chunk=chunk, us=us if valid else None, registers=regs,
                          spills=spills, **variant.constants))
        log(f"  layers kernel, {per_sm * sms} programs x {warps} warps, chunk {chunk}: "
            f"{us:.1f} us ({regs} registers, {spills} spills)" +
            ("" if valid else " (INVALID: a wait gave up; programs not all resident?)"))
    out["layers_kernel"] = sweep
    best = min((v for v in sweep if v["us"] is not None), key=lambda v: v["us"])
    log(f"  stage profile of the best ({best['programs']} programs x {best['warps']} warps, chunk {best['chunk']}):")
    variant = megakernel.make_plan(runner.config, runner.weights, runner.kv_cache.data, programs=best["programs"],
                                   chunk=best["chunk"])._replace(warps=best["warps"])
    out["stage_profile"] = stage_profile(runner, variant)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama-3.2-1b"])
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--check-steps", type=int, default=32)
    parser.add_argument("--cache-dir", default="/tmp/edgellm-bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/trials/persistent/bench.py needs a CUDA GPU", file=sys.stderr)
        return 2
    bandwidth = benchmark.copy_bandwidth()
    results = [one_shape(shape, args, bandwidth) for shape in args.shapes]
    meta = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
                commit=os.environ.get("EDGELLM_COMMIT", "unknown"), copy_TBps=bandwidth / 1e12,
                isl=args.isl, osl=args.osl)
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    print(f"\n{meta['device']}  commit {meta['commit']}  copy {bandwidth / 1e12:.2f} TB/s  ISL {args.isl} OSL {args.osl}")
    print(f"{'shape':14s} {'floor tok/s':>11s} {'chain tok/s':>11s} {'chain ms/step':>13s} {'max rel err':>11s} "
          f"{'best layers kernel':>24s}")
    for r in results:
        best = min((v for v in r["layers_kernel"] if v["us"] is not None), key=lambda v: v["us"])
        print(f"{r['shape']:14s} {1e3 / r['floor_ms']:11.0f} {r['chain']['tokens_per_s']:11.0f} "
              f"{r['chain']['ms_per_step']:13.3f} {r['teacher_forced_max_rel_err']:11.1e} "
              f"{best['us']:7.1f} us ({best['programs']}x{best['warps']}w)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
