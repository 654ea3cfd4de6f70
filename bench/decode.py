"""End-to-end decode / TTFT benchmark: edgellm against transformers' generate and against our own
reference path (the `_ref` torch ops) under torch.compile(mode="reduce-overhead"), in one run.

Run on a CUDA GPU:  python bench/decode.py --json bench/results/decode.json
Shapes: Llama-3.2-1B and SmolLM2-135M with random fp16 weights; prompt 128, 256 new tokens, batch
1/4/16/64; TTFT for 128/1024/4096-token prompts. Baseline decode runs are shorter (--baseline-osl)
because transformers' eager generate is slow; tokens/s does not depend on the run length beyond the
growth of the KV cache.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm import benchmark  # noqa: E402
from edgellm.benchmark import log, timed  # noqa: E402
from edgellm.engine.model import forward_logits  # noqa: E402
from edgellm.engine.runner import LLMEngineRunner  # noqa: E402
from edgellm.engine.weights import LayerWeights, ModelWeights  # noqa: E402
from edgellm.kernels.ops import reference_ops  # noqa: E402

ANCHORS = Path(__file__).resolve().parents[2] / "shared" / "anchors" / "h100-2026-11-22.json"


def hf_figures(model_dir: Path, batches, isl: int, osl: int, ttft_lens, bandwidth: float) -> dict:
    """transformers' generate (eager, greedy, its default dynamic cache) on the same weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16).cuda().eval()
    vocab = model.config.vocab_size

    def generate(ids, new):
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)

    out = dict(decode=[], ttft=[])
    for batch in batches:
        ids = torch.randint(10, vocab, (batch, isl), device="cuda")
        generate(ids, 2)  # warm-up
        t_one = statistics.median(timed(lambda: generate(ids, 1))[0] for _ in range(2))
        t_all = timed(lambda: generate(ids, osl))[0]
        ms = (t_all - t_one) / (osl - 1) * 1e3
        out["decode"].append(dict(batch=batch, tokens_per_s=batch / ms * 1e3, ms_per_step=ms))
        log(f"  transformers decode b{batch}: {batch / ms * 1e3:.0f} tok/s")
    for length in ttft_lens:
        ids = torch.randint(10, vocab, (1, length), device="cuda")
        generate(ids, 1)
        ms = statistics.median(timed(lambda: generate(ids, 1))[0] for _ in range(3)) * 1e3
        out["ttft"].append(dict(prompt_len=length, ttft_ms=ms))
        log(f"  transformers TTFT {length}: {ms:.1f} ms")
    out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del model
    torch.cuda.empty_cache()
    return out


class _ReferenceDecoder(torch.nn.Module):
    """Our model forward on the `_ref` ops. Weights, RoPE tables and the KV caches are module buffers,
    so that torch.compile's CUDA graphs treat them as static tensors (the cache written in place)
    instead of copying them in at every replay."""

    def __init__(self, runner: LLMEngineRunner):
        super().__init__()
        self.config, self.kernels = runner.config, reference_ops()
        self.layer_count = runner.config.num_decoder_layers
        w = runner.weights
        self.layer_fields = [name for name, value in vars(w.layers[0]).items() if value is not None]
        for i, layer in enumerate(w.layers):
            for name in self.layer_fields:
                self.register_buffer(f"l{i}_{name}", getattr(layer, name), persistent=False)
        for name in ("embed", "final_norm", "lm_head"):
            self.register_buffer(name, getattr(w, name), persistent=False)
        self.register_buffer("cos", runner.rope_cos_sin[0], persistent=False)
        self.register_buffer("sin", runner.rope_cos_sin[1], persistent=False)
        # Its own cache, one K and one V buffer per layer (as gpt-fast keeps it): written in place
        # through a view of one big buffer, the compiled step copied far more than the new keys.
        for i in range(self.layer_count):
            self.register_buffer(f"k{i}", torch.zeros_like(runner.kv_cache.data[i, 0]), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros_like(runner.kv_cache.data[i, 1]), persistent=False)

    def forward(self, embeds, slots, starts, q_lens):
        layers = [LayerWeights(**{name: getattr(self, f"l{i}_{name}", None) for name in vars(LayerWeights)
                                  ["__dataclass_fields__"]}) for i in range(self.config.num_decoder_layers)]
        weights = ModelWeights(embed=self.embed, layers=layers, final_norm=self.final_norm, lm_head=self.lm_head)
        # The module is its own cache object (layer(i) below): no object built here, no graph break.
        return forward_logits(weights, self.config, self, (self.cos, self.sin), embeds, slots, starts, q_lens,
                              kernels=self.kernels)

    def layer(self, index: int):
        return getattr(self, f"k{index}"), getattr(self, f"v{index}")


def compiled_figures(runner: LLMEngineRunner, batches, isl: int, osl: int, ttft_lens) -> dict:
    """Our reference path compiled with mode="reduce-overhead" (greedy argmax: the sort-based
    sampling reference does not compile on this torch, see bench/RESULTS.md)."""
    # Each prefill length and decode batch is its own specialisation of the same functions: allow
    # them all (the default limit of 8 sends the rest back to eager, a much slower baseline).
    torch._dynamo.reset()
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    decoder = _ReferenceDecoder(runner)
    step = torch.compile(decoder, mode="reduce-overhead", dynamic=False)
    prefill = torch.compile(decoder, dynamic=False)
    lengths = runner.kv_cache.lengths
    out = dict(decode=[], ttft=[])
    for batch in batches:
        slots = torch.arange(batch, dtype=torch.int32, device="cuda")
        ones = torch.ones(batch, dtype=torch.int32, device="cuda")
        ids = torch.randint(10, runner.config.vocab_size, (batch, isl), device="cuda")

        def run(steps):
            lengths.zero_()
            logits = prefill(runner.embed(ids), slots, torch.zeros_like(slots), torch.full_like(slots, isl))
            lengths[:batch] = isl
            tokens = logits.argmax(-1)
            for _ in range(steps):
                starts = lengths[:batch].clone()
                # A new decode step: the previous step's graph outputs are dead (else CUDA-graph trees
                # record a new graph at every call).
                torch.compiler.cudagraph_mark_step_begin()
                logits = step(runner.embed(tokens)[:, None], slots, starts, ones)
                lengths[:batch] = starts + 1
                tokens = logits.argmax(-1)

        try:
            run(3)  # compile + warm-up + graph capture
            t_one = statistics.median(timed(lambda: run(1))[0] for _ in range(2))
            t_all = timed(lambda: run(osl))[0]
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot compile is reported as missing
            log(f"  compiled reference b{batch} failed: {type(exc).__name__}: {str(exc)[:300]}")
            out["decode"].append(dict(batch=batch, tokens_per_s=None, ms_per_step=None, error=type(exc).__name__))
            continue
        ms = (t_all - t_one) / (osl - 1) * 1e3
        out["decode"].append(dict(batch=batch, tokens_per_s=batch / ms * 1e3, ms_per_step=ms))
        log(f"  compiled reference decode b{batch}: {batch / ms * 1e3:.0f} tok/s")
    for length in ttft_lens:
        slot = torch.zeros(1, dtype=torch.int32, device="cuda")
        ids = torch.randint(10, runner.config.vocab_size, (1, length), device="cuda")

        def first_token():
            prefill(runner.embed(ids), slot, torch.zeros_like(slot), torch.full_like(slot, length)).argmax(-1)

        try:
            first_token()
            ms = statistics.median(timed(first_token)[0] for _ in range(3)) * 1e3
        except Exception as exc:  # noqa: BLE001
            log(f"  compiled reference TTFT {length} failed: {type(exc).__name__}")
            ms = None
        out["ttft"].append(dict(prompt_len=length, ttft_ms=ms))
        if ms is not None:
            log(f"  compiled reference TTFT {length}: {ms:.1f} ms")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["llama-3.2-1b", "smollm2-135m"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=256)
    parser.add_argument("--ttft", type=int, nargs="*", default=[128, 1024, 4096])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--baseline-osl", type=int, default=32, help="decode steps of the baseline runs")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline only")
    parser.add_argument("--compile-batch", type=int, nargs="*", default=[1, 16],
                        help="batches of the compiled baseline (each costs a compilation)")
    parser.add_argument("--compile-ttft", type=int, nargs="*", default=[1024])
    parser.add_argument("--cache-dir", default="/tmp/edgellm-bench")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    results = []
    for shape in args.shapes:
        model_dir = benchmark.random_model_dir(shape, args.cache_dir)
        runner = benchmark.make_runner(model_dir, batches=args.batch, isl=args.isl, osl=args.osl,
                                       ttft_lens=args.ttft)
        log(f"{shape}: edgellm")
        ours = benchmark.run(shape, batches=args.batch, isl=args.isl, osl=args.osl, ttft_lens=args.ttft,
                             iterations=args.iterations, runner=runner)
        entry = dict(shape=shape, edgellm=ours)
        if not args.no_baselines:
            log(f"{shape}: compiled reference path")
            entry["torch_compile_reference"] = compiled_figures(runner, args.compile_batch, args.isl,
                                                                args.baseline_osl, args.compile_ttft)
            del runner
            torch.cuda.empty_cache()
        if not (args.no_baselines or args.no_transformers):
            log(f"{shape}: transformers generate")
            entry["transformers"] = hf_figures(model_dir, args.batch, args.isl, args.baseline_osl, args.ttft,
                                               ours["copy_TBps"] * 1e12)
        results.append(entry)
    meta = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=__import__("triton").__version__, commit=os.environ.get("EDGELLM_COMMIT", "unknown"),
                isl=args.isl, osl=args.osl, baseline_osl=args.baseline_osl)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  commit {meta['commit']}  "
          f"ISL {args.isl} OSL {args.osl} (baselines {args.baseline_osl})")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(f"{'shape':<14s} {'batch':>5s} {'tok/s':>8s} {'ms/step':>8s} {'% floor':>7s} {'compile tok/s':>13s} "
          f"{'HF tok/s':>9s} {'x compile':>9s}")
    for entry in results:
        ours = entry["edgellm"]
        comp = {r["batch"]: r for r in entry.get("torch_compile_reference", {}).get("decode", [])}
        hf = {r["batch"]: r for r in entry.get("transformers", {}).get("decode", [])}
        for r in ours["decode"]:
            c = comp.get(r["batch"], {}).get("tokens_per_s")
            h = hf.get(r["batch"], {}).get("tokens_per_s")
            print(f"{entry['shape']:<14s} {r['batch']:5d} {r['tokens_per_s']:8.0f} {r['ms_per_step']:8.3f} "
                  f"{r['pct_of_floor']:6.0f}% {fmt(c, '13.0f'):>13s} {fmt(h, '9.1f'):>9s} "
                  f"{fmt(r['tokens_per_s'] / c if c else None, '8.1f'):>8s}x")
        ttft = {r["prompt_len"]: r["ttft_ms"] for r in ours["ttft"]}
        cttft = {r["prompt_len"]: r["ttft_ms"] for r in entry.get("torch_compile_reference", {}).get("ttft", [])}
        httft = {r["prompt_len"]: r["ttft_ms"] for r in entry.get("transformers", {}).get("ttft", [])}
        for length in ttft:
            print(f"{entry['shape']:<14s} TTFT {length:5d}: {ttft[length]:7.2f} ms   compiled ref "
                  f"{fmt(cttft.get(length), '.2f')} ms   transformers {fmt(httft.get(length), '.2f')} ms")
    if ANCHORS.is_file():
        peer = json.loads(ANCHORS.read_text())["gptfast_compiled"]
        print(f"peer torch.compile decoder (H100, 2026-11-22): 1B b1 {peer['llama3.2-1b_b1_decode_tok_s']} tok/s, "
              f"1B b16 {peer['llama3.2-1b_b16_decode_tok_s']} tok/s, 135M b1 {peer['smollm2-135m_b1_decode_tok_s']} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
