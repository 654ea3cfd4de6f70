"""Speculative decoding on a CUDA GPU (issue 13), each figure beside plain decoding in the same run.

1. The real default model (SmolLM2-135M-Instruct, converted from its GGUF), batch 1, greedy, 256 new
   tokens: n-gram prompt lookup on prompts that copy (editing a code file, quoting a passage,
   rewriting a list) and on prompts with nothing to copy. Decode tokens/s with and without
   speculation (the same runtime, `speculative=False` per request), outputs compared token by token.
2. The verify step's cost on the SmolLM2-135M and Llama-3.2-1B shapes (random weights), batch 1: a
   CUDA-graph step of T tree nodes against one plain decode step, T = 2, 4, 8, 16.
3. Draft models on the real model: a random-weights draft (the overhead floor: nothing is accepted)
   and the model's own first layers as a draft (what a cheap draft accepts).

Run:  python bench/speculative.py --json bench/results/speculative.json   (parts: --parts ngram verify draft)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgellm import LLMEngineRunner, LLMGenerationRequest, LLMInferenceRuntime, SpeculativeConfig  # noqa: E402
from edgellm.benchmark import log, random_model_dir  # noqa: E402

CODE = '''import csv
from dataclasses import dataclass


@dataclass
class Record:
    name: str
    city: str
    amount: float


def parse_record(row: list[str]) -> Record:
    name, city, amount = row
    return Record(name=name.strip(), city=city.strip(), amount=float(amount))


def load(path: str) -> list[Record]:
    with open(path, newline="") as f:
        return [parse_record(row) for row in csv.reader(f)]


def total_by_city(records: list[Record]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for record in records:
        totals[record.city] = totals.get(record.city, 0.0) + record.amount
    return totals
'''

PASSAGE = ("The lighthouse at Cape Morrow was built in 1871 from granite quarried on the island itself. "
           "Its lamp burned whale oil until 1890, when kerosene replaced it, and electricity arrived only in "
           "1934. The keepers lived in a cottage beside the tower and rowed to the mainland once a month for "
           "supplies. In 1962 the light was automated, and the last keeper, Margaret Hale, left the island after "
           "twenty-two years of service. Today the tower is a museum, and its original lens is displayed in the "
           "entrance hall.")

ITEMS = ["rice", "lentils", "olive oil", "tomatoes", "onions", "garlic", "basil", "lemons", "yogurt", "eggs",
         "flour", "butter", "honey", "oats", "spinach", "carrots"]

COPY_PROMPTS = {
    "code edit": f"Here is a Python module:\n```python\n{CODE}```\nRename the function parse_record to "
                 "read_record everywhere and print the whole module again, otherwise unchanged.",
    "quotes": f"Passage: {PASSAGE}\n\nAnswer only with sentences copied exactly from the passage: when was the "
              "lighthouse built, how was it lit, and what happened in 1962?",
    "list": "Here is a shopping list:\n" + "\n".join(f"{i + 1}. {item}" for i, item in enumerate(ITEMS)) +
            "\n\nWrite the same list again, numbered the same way, with each item in capital letters.",
}
FREE_PROMPTS = {
    "story": "Write a short story about a fox who learns to sail.",
    "explain": "Explain why the sky is blue to a ten-year-old.",
    "ideas": "Give me some ideas for a rainy weekend.",
}


def chat(prompt: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}]}


def compare(runtime, prompts: dict, new_tokens: int, repeats: int) -> list[dict]:
    """Per prompt: decode tokens/s without and with speculation (median of `repeats`, alternating)."""
    rows = []
    for name, prompt in prompts.items():
        request = dict(requests=[chat(prompt)], max_generate_length=new_tokens, temperature=0)
        runtime.handle_request(LLMGenerationRequest(**request))  # graphs of this prompt length
        runtime.handle_request(LLMGenerationRequest(**request, speculative=False))
        plain, spec, host, last = [], [], [], {}
        for _ in range(repeats):
            for on, out in ((False, plain), (True, spec)):
                response = runtime.handle_request(LLMGenerationRequest(**request, speculative=on))
                out.append(response.timings.decode_tokens_per_s)
                last[on] = response
            stats = last[True].speculative
            host.append(stats.propose_ms / max(1, stats.verify_steps + stats.plain_steps))
        stats = last[True].speculative
        rows.append(dict(prompt=name, tokens=len(last[True].output_ids[0]),
                         identical=last[True].output_ids == last[False].output_ids,
                         plain_tok_s=statistics.median(plain), spec_tok_s=statistics.median(spec),
                         speedup=statistics.median(spec) / statistics.median(plain),
                         acceptance=stats.acceptance_rate, tokens_per_step=stats.tokens_per_step,
                         propose_ms_per_step=statistics.median(host),
                         ms_per_step=1e3 / statistics.median(spec) * stats.tokens_per_step))
        log(f"  {name}: plain {rows[-1]['plain_tok_s']:.0f} tok/s, speculative {rows[-1]['spec_tok_s']:.0f} "
            f"({rows[-1]['speedup']:.2f}x), acceptance {stats.acceptance_rate:.2f}, identical {rows[-1]['identical']}")
    return rows


def ngram_part(model_dir: Path, repeats: int) -> dict:
    runtime = LLMInferenceRuntime(model_dir, device="cuda", max_batch_size=1, max_input_length=1024,
                                  max_kv_cache_capacity=2048, speculative=SpeculativeConfig())
    return dict(copy=compare(runtime, COPY_PROMPTS, 256, repeats), free=compare(runtime, FREE_PROMPTS, 256, repeats))


def verify_part(cache_dir: str, shape: str, steps: int = 200) -> list[dict]:
    """ms per step of plain decode graphs and of verify graphs of T nodes (chains of random drafts,
    so the row advances about one token per step, as in plain decoding)."""
    model_dir = random_model_dir(shape, cache_dir)
    runner = LLMEngineRunner(model_dir, device="cuda", max_batch_size=1, max_input_length=1024,
                             max_kv_cache_capacity=4096, max_verify_tokens=16)
    vocab = runner.config.vocab_size

    def run(nodes: int | None) -> float:
        prompt = torch.randint(10, vocab, (1, 128), device="cuda")
        logits = runner.prefill_step(runner.embed(prompt), [128])
        zeros = torch.zeros(1, device="cuda")
        runner.start_decode(logits.argmax(-1), [0], zeros, torch.ones(1, dtype=torch.int32), torch.ones(1),
                            torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
        tokens = torch.randint(10, vocab, (1, nodes or 1))
        parents = torch.arange(-1, (nodes or 1) - 1, dtype=torch.int32)[None]
        n_nodes = torch.tensor([nodes or 1], dtype=torch.int32)
        step = runner.decode_sample_step if nodes is None else lambda: runner.verify_sample_step(tokens, parents, n_nodes)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        runner.end_decode()
        return (time.perf_counter() - began) / steps * 1e3

    plain = statistics.median(run(None) for _ in range(3))
    rows = [dict(shape=shape, nodes=1, ms_per_step=plain, x_plain=1.0)]
    for nodes in (2, 4, 8, 16):
        ms = statistics.median(run(nodes) for _ in range(3))
        rows.append(dict(shape=shape, nodes=nodes, ms_per_step=ms, x_plain=ms / plain))
        log(f"  {shape} verify {nodes} nodes: {ms:.3f} ms ({ms / plain:.2f}x a plain step of {plain:.3f} ms)")
    del runner
    torch.cuda.empty_cache()
    return rows


def layer_draft(model_dir: Path, out: Path, layers: int, random_weights: bool) -> Path:
    """A draft of the model's first `layers` layers (its own weights, or random ones of that shape)."""
    from safetensors.torch import load_file, save_file

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config))
    tensors = {}
    generator = torch.Generator().manual_seed(0)
    for file in model_dir.glob("*.safetensors"):
        for name, tensor in load_file(file).items():
            parts = name.split(".")
            if "layers" in parts and int(parts[parts.index("layers") + 1]) >= layers:
                continue
            if random_weights:
                tensor = torch.ones_like(tensor) if name.endswith("norm.weight") else \
                    (torch.randn(tensor.shape, generator=generator) * 0.02).to(tensor.dtype)
            tensors[name] = tensor.contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def draft_part(model_dir: Path, work: Path, repeats: int) -> list[dict]:
    rows = []
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    for label, n, random_weights, k in (("random weights, 4 layers", 4, True, 4),
                                        (f"own first 8 of {layers} layers", 8, False, 4),
                                        (f"own first 15 of {layers} layers", 15, False, 4)):
        draft = layer_draft(model_dir, work / f"draft-{n}-{int(random_weights)}", n, random_weights)
        runtime = LLMInferenceRuntime(model_dir, device="cuda", max_batch_size=1, max_input_length=1024,
                                      max_kv_cache_capacity=2048,
                                      speculative=SpeculativeConfig(method="draft", draft_model=draft,
                                                                    num_speculative_tokens=k))
        log(f" draft: {label}")
        for kind, prompts in (("copy", COPY_PROMPTS), ("free", FREE_PROMPTS)):
            for row in compare(runtime, prompts, 256, repeats):
                rows.append(dict(draft=label, kind=kind, **row))
        del runtime
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["ngram", "verify", "draft"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", default=os.environ.get("EDGELLM_BENCH_CACHE", "/tmp/edgellm-bench"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from edgellm import default_model_dir

    result = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
                  commit=os.environ.get("EDGELLM_COMMIT", "unknown"), torch=torch.__version__)
    model_dir = default_model_dir() if {"ngram", "draft"} & set(args.parts) else None
    if "ngram" in args.parts:
        log("n-gram prompt lookup, default model, batch 1")
        result["ngram"] = ngram_part(model_dir, args.repeats)
    if "verify" in args.parts:
        log("verify step, batch 1")
        result["verify"] = [row for shape in ("smollm2-135m", "llama-3.2-1b") for row in verify_part(args.cache_dir, shape)]
    if "draft" in args.parts:
        log("draft models, default model, batch 1")
        result["draft"] = draft_part(model_dir, Path(args.cache_dir), args.repeats)
    print_tables(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


def print_tables(result: dict) -> None:
    print(f"\n{result['device']}, commit {result['commit']}")
    if "ngram" in result:
        print("\nn-gram, SmolLM2-135M-Instruct, batch 1, greedy, 256 tokens")
        print(f"{'prompt':>10} {'kind':>5} {'plain tok/s':>12} {'spec tok/s':>11} {'x':>6} {'accept':>7} "
              f"{'tok/step':>9} {'host ms/step':>13} {'same':>5}")
        for kind in ("copy", "free"):
            for r in result["ngram"][kind]:
                print(f"{r['prompt']:>10} {kind:>5} {r['plain_tok_s']:12.0f} {r['spec_tok_s']:11.0f} {r['speedup']:6.2f} "
                      f"{r['acceptance']:7.2f} {r['tokens_per_step']:9.2f} {r['propose_ms_per_step']:13.3f} "
                      f"{str(r['identical']):>5}")
    if "verify" in result:
        print("\nverify step, batch 1 (nodes 1 = a plain decode step)")
        print(f"{'shape':>13} {'nodes':>6} {'ms/step':>8} {'x plain':>8}")
        for r in result["verify"]:
            print(f"{r.get('shape', 'llama-3.2-1b'):>13} {r['nodes']:6d} {r['ms_per_step']:8.3f} {r['x_plain']:8.2f}")
    if "draft" in result:
        print("\ndraft models, SmolLM2-135M-Instruct, batch 1, greedy, 256 tokens, k = 4")
        print(f"{'draft':>26} {'prompt':>10} {'plain tok/s':>12} {'spec tok/s':>11} {'x':>6} {'accept':>7} {'same':>5}")
        for r in result["draft"]:
            print(f"{r['draft']:>26} {r['prompt']:>10} {r['plain_tok_s']:12.0f} {r['spec_tok_s']:11.0f} "
                  f"{r['speedup']:6.2f} {r['acceptance']:7.2f} {str(r['identical']):>5}")


if __name__ == "__main__":
    main()
