"""The `edgellm` command: thin wrappers that parse arguments, call the public API and print."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .backend_bench import BACKEND_CHOICES
from .cli_run import cmd_run
from .cli_serve import add_serve_options, cmd_serve
from .cli_writers import add_model_dir_argument, add_writer_parsers
from .errors import EdgeLLMError


def _add_model_options(p: argparse.ArgumentParser) -> None:
    add_model_dir_argument(p)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float32 on CPU, "
                                                  "float16 on CUDA)")
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--max-input-length", type=int, default=None)
    p.add_argument("--max-kv-cache-capacity", type=int, default=None)
    p.add_argument("--lora", action="append", default=None, metavar="NAME=PATH",
                   help="load a LoRA adapter (PEFT directory) under NAME (repeatable); the first one is active: "
                        "requests that name no adapter use it")
    p.add_argument("--max-lora-rank", type=int, default=None, help="largest adapter rank (default: the largest given)")
    p.add_argument("--reduced-vocab-dir", default=None,
                   help="decode over a reduced vocabulary (a vocab_map.safetensors directory from `edgellm "
                        "reduce-vocab`; default: the model directory's, if it has one)")
    p.add_argument("--full-vocab", action="store_true", help="ignore a vocab_map.safetensors in the model directory")
    p.add_argument("--deterministic", action="store_true",
                   help="batch-invariant decoding: a request's tokens do not depend on what runs beside it "
                        "(README: Deterministic decoding, what it costs)")
    _quantization_options(p)
    g = p.add_argument_group("KV reuse (saved prompt prefixes; any of these turns it on)")
    g.add_argument("--kv-reuse", action="store_true", help="reuse saved prefixes with the default device budget")
    g.add_argument("--kv-gpu-mb", type=int, default=None, help="device memory for saved blocks (default 256 MB)")
    g.add_argument("--kv-host-mb", type=int, default=None, help="pinned host RAM for blocks evicted from the device")
    g.add_argument("--kv-disk-dir", default=None, help="directory of saved blocks kept across runs and processes")
    g.add_argument("--kv-block-tokens", type=int, default=None, help="tokens per saved block (default 64)")
    g = p.add_argument_group("speculative decoding (outputs are the same; only the speed changes)")
    g.add_argument("--speculative", choices=("ngram", "draft"), default=None,
                   help="ngram: prompt lookup, no extra model; draft: a smaller model proposes (--draft-model)")
    g.add_argument("--draft-model", default=None, help="draft model directory (same tokenizer); implies --speculative draft")
    g.add_argument("--num-speculative-tokens", type=int, default=None, help="draft chain length (default 4)")
    g.add_argument("--draft-top-k", type=int, default=None, help="draft's best tokens per depth, as tree siblings (default 1)")
    g.add_argument("--max-verify-tokens", type=int, default=None, help="largest tree verified per step (default 16)")


def _speculative(args):
    """SpeculativeConfig from the speculative options, or None when none is given."""
    from .speculative import SpeculativeConfig

    method = args.speculative or ("draft" if args.draft_model else None)
    if method is None:
        return None
    given = {"draft_model": args.draft_model, "num_speculative_tokens": args.num_speculative_tokens,
             "draft_top_k": args.draft_top_k, "max_verify_tokens": args.max_verify_tokens}
    return SpeculativeConfig(method=method, **{k: v for k, v in given.items() if v is not None})


def _kv_reuse(args):
    """KVReuseSettings from the --kv-* options, or None when none is given."""
    from .engine.kv_store import KVReuseSettings

    given = {"gpu_bytes": None if args.kv_gpu_mb is None else args.kv_gpu_mb << 20,
             "host_bytes": None if args.kv_host_mb is None else args.kv_host_mb << 20,
             "disk_dir": args.kv_disk_dir, "block_tokens": args.kv_block_tokens}
    given = {k: v for k, v in given.items() if v is not None}
    return KVReuseSettings(**given) if given or args.kv_reuse else None


def _lora_weights(specs) -> dict | None:
    if not specs:
        return None
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise EdgeLLMError(f"--lora takes NAME=PATH, got {spec!r}")
        adapters[name] = path
    return adapters


def _add_sampling_options(p: argparse.ArgumentParser, temperature_default) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", "-t", type=float, default=temperature_default,
                   help="0 = greedy" + (f" (default {temperature_default})" if temperature_default is not None
                                        else " (default: the model's generation config, else 1.0)"))
    p.add_argument("--top-k", type=int, default=None, help="0 disables (default: model's, else 50)")
    p.add_argument("--top-p", type=float, default=None, help="in (0, 1]; 1 disables (default: model's, else 1)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling; same seed, same output")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _quantization_options(p) -> None:
    p.add_argument("--quantization", choices=("int8", "int4", "fp8"), default=None,
                   help="weight-only quantization at load: int8 / fp8 per output channel, int4 in groups of 128")
    p.add_argument("--quantize-lm-head", action="store_true", help="pack the LM head too (with --quantization)")


def _runtime(args, **extra):
    from .runtime import LLMInferenceRuntime

    adapters = _lora_weights(args.lora)
    runtime = LLMInferenceRuntime(args.model_dir, device=args.device, dtype=args.dtype, **extra,
                                  max_batch_size=args.max_batch_size, max_input_length=args.max_input_length,
                                  max_kv_cache_capacity=args.max_kv_cache_capacity, lora_weights=adapters,
                                  max_lora_rank=args.max_lora_rank, kv_reuse=_kv_reuse(args),
                                  speculative=_speculative(args),
                                  reduced_vocab_dir=False if args.full_vocab else args.reduced_vocab_dir,
                                  quantization=args.quantization, quantize_lm_head=args.quantize_lm_head,
                                  deterministic=args.deterministic)
    if adapters:
        runtime.switch_lora_weights(next(iter(adapters)))
    return runtime


def _request(args, items):
    from .requests import LLMGenerationRequest

    return LLMGenerationRequest(requests=items, max_generate_length=args.max_tokens,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                seed=args.seed, stop=args.stop)


def _print_timings(response) -> None:
    t = response.timings
    vision = f"images {t.image_preprocess_ms:.1f} ms + vision {t.vision_ms:.1f} ms, " if t.vision_ms else ""
    print(f"[{vision}prefill {t.prefill_ms:.1f} ms, {t.decode_tokens} decode tokens at {t.decode_tokens_per_s:.1f} "
          f"tok/s, total {t.total_ms:.1f} ms]", file=sys.stderr)
    if response.kv_reuse is not None:
        print(f"[{response.kv_reuse.log_line()}]", file=sys.stderr)
    spec = response.speculative
    if spec is not None:
        print(f"[speculative: accepted {spec.accepted} of {spec.proposed} drafts ({spec.acceptance_rate:.0%}), "
              f"{spec.tokens_per_step:.2f} tokens per step, {spec.verify_steps} verify and {spec.plain_steps} plain "
              "steps]", file=sys.stderr)


_ACCEPTED, _RESET = "\033[1;32m", "\033[0m"  # bold green: tokens that came from accepted drafts


def accepted_spans(tokenizer, ids: list[int], flags: list[bool], text: str, colour: bool) -> str:
    """`text` (the response's, possibly cut at a stop string) with the tokens that came from accepted
    drafts in colour (seed 003's demo); plain text when `colour` is off."""
    if not colour:
        return text
    out, start = [], 0
    for j, accepted in enumerate(flags):  # token j spans the growth of the decoded text it caused
        end = max(start, min(len(text), len(tokenizer.decode(ids[:j + 1]))))
        piece = text[start:end]
        out.append(f"{_ACCEPTED}{piece}{_RESET}" if accepted and piece else piece)
        start = end
    return "".join(out) + text[start:]


def _read_text(value: str, what: str) -> str:
    """A command-line text, or stdin's when it is "-"."""
    text = sys.stdin.read() if value == "-" else value
    if not text.strip():
        raise EdgeLLMError(f"the {what} is empty")
    return text


def _print_json(response, **extra) -> None:
    print(json.dumps({**extra, **response.to_dict()}, ensure_ascii=False))


def cmd_generate(args) -> int:
    args.prompt = _read_text(args.prompt, "prompt")  # before the model loads
    runtime = _runtime(args)
    images = args.image or []
    if args.raw:
        item = {"prompt": args.prompt, **({"images": images} if images else {})}
    else:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        item = {"messages": messages + [{"role": "user", "content": _content(args.prompt, images)}]}

    def stream(_, delta):
        print(delta, end="", flush=True)

    streaming = args.stream and not args.show_accepted and not args.json
    response = runtime.handle_request(_request(args, [item]), on_text=stream if streaming else None)
    if args.json:
        _print_json(response)
    elif streaming:
        print()
    elif args.show_accepted and response.speculative is not None and runtime.tokenizer is not None:
        print(accepted_spans(runtime.tokenizer, response.output_ids[0], response.speculative.accepted_flags[0],
                             response.output_texts[0], colour=sys.stdout.isatty()))
    else:
        print(response.output_texts[0])
    if args.timings or args.show_accepted:
        _print_timings(response)
    return 0


def _content(text: str, images: list[str]):
    """A user message's content: the text alone, or image parts then the text."""
    if not images:
        return text
    return [{"type": "image", "image": path} for path in images] + [{"type": "text", "text": text}]


def cmd_chat(args) -> int:
    runtime = _runtime(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    images: list[str] = []  # /image PATH: sent with the next message
    print("edgellm chat: type a message; /image PATH attaches an image to the next one (vision-language "
          "models), /reset clears the conversation, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages, images = (messages[:1] if args.system else []), []
            print("[conversation cleared]", file=sys.stderr)
            continue
        if line.strip().startswith("/image"):
            path = line.strip()[len("/image"):].strip()
            if not path:
                print("usage: /image PATH", file=sys.stderr)
            elif not Path(path).expanduser().is_file():
                print(f"[no image file {path}]", file=sys.stderr)
            else:
                images.append(str(Path(path).expanduser()))
                print(f"[image {path} goes with your next message]", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": _content(line, images)})
        try:
            stream = None if args.json else lambda _, delta: print(delta, end="", flush=True)
            response = runtime.handle_request(_request(args, [{"messages": list(messages)}]), on_text=stream)
        except EdgeLLMError as exc:
            messages.pop()
            images = []
            print(f"error: {exc}", file=sys.stderr)
            continue
        images = []
        if args.json:
            _print_json(response)
        else:
            print()
        if args.timings:
            _print_timings(response)
        messages.append({"role": "assistant", "content": response.output_texts[0]})


def cmd_info(args) -> int:
    import dataclasses

    from .engine.backends.export_format import is_export
    from .engine.config import EngineConfig
    from .engine.devices import resolve_device, resolve_dtype
    from .engine.memory import gib
    from .engine.vocab_map import MAP_FILE, load_vocab_map, map_path
    from .engine.weights import weight_bytes
    from .models import resolve_model_dir

    model_dir = resolve_model_dir(args.model_dir)
    if is_export(model_dir):
        return _export_info(model_dir)
    config = EngineConfig.from_model_dir(model_dir, max_batch_size=args.max_batch_size,
                                         max_input_length=args.max_input_length,
                                         max_kv_cache_capacity=args.max_kv_cache_capacity)
    where = args.reduced_vocab_dir or (model_dir if (model_dir / MAP_FILE).is_file() else None)
    if where is not None:
        reduced = load_vocab_map(where, config.vocab_size, config.eos_token_ids)
        config = dataclasses.replace(config, reduced_vocab_size=reduced.numel())
    if args.quantize_lm_head and not args.quantization:
        raise EdgeLLMError("--quantize-lm-head needs --quantization")
    stored = config.quantization  # a checkpoint written quantized (edgellm quantize, AWQ, GPTQ) loads as stored
    if stored and args.quantization not in (None, stored):
        raise EdgeLLMError(f"this checkpoint is already {stored}; it cannot be loaded as {args.quantization}")
    config = dataclasses.replace(config, quantization=args.quantization or stored,
                                 quantize_lm_head=args.quantize_lm_head)
    print(f"model directory              {model_dir}")
    if where is not None:
        print(f"reduced vocabulary map       {map_path(where)}")
    dtype = resolve_dtype(args.dtype, resolve_device(args.device))
    nbytes = weight_bytes(config, dtype)
    print(f"weights on the device        {nbytes:,} bytes = {gib(nbytes)} ({str(dtype).removeprefix('torch.')}"
          f"{', ' + config.quantization + ' linear weights' if config.quantization else ''})")
    print(config.describe())
    return 0


def _export_info(export_dir: Path) -> int:
    """`edgellm info` on a directory `edgellm export` wrote: the graph's engine, not a checkpoint."""
    from .engine.backends.export_format import ONNX_FILE, read_engine_json

    described = read_engine_json(export_dir)
    graph = sum(f.stat().st_size for f in export_dir.glob(ONNX_FILE + "*"))
    print(f"export directory             {export_dir} (an ONNX graph from `edgellm export`, run by onnxruntime)")
    print(f"source model                 {described.get('source', '?')}")
    print(f"graph                        {graph:,} bytes, {described['dtype']}, opset {described['opset']}")
    for name, value in described["limits"].items():
        print(f"{name:28s} {value}")
    print(f"run it with                  edgellm generate -m {export_dir} \"PROMPT\"  (base model only: no LoRA, "
          "KV reuse, speculation or reduced vocabulary)")
    return 0


def cmd_bench(args) -> int:
    from . import benchmark

    if args.plot_from:  # plot saved results: no GPU work
        if not args.plot:
            raise EdgeLLMError("--from plots saved results: give --plot OUT.png too")
        from .bench_plot import load_results, plot_decode

        drawn = plot_decode(load_results(args.plot_from), args.plot)
        print(f"wrote {args.plot}: " + "; ".join(f"{m}: {', '.join(s)}" for m, s in drawn.items()))
        return 0
    model = args.shape or args.model_dir
    if args.backend:
        if args.quantization:
            raise EdgeLLMError("--quantization times our engine alone: drop --backend (or --quantization)")
        return _bench_backends(args, model)
    if model is None:
        raise EdgeLLMError("give --shape (" + ", ".join(benchmark.SHAPES) + ") or --model-dir")
    if args.quantize_lm_head and not args.quantization:
        raise EdgeLLMError("--quantize-lm-head needs --quantization")
    if args.plot:  # fail before the GPU work, not after it
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise EdgeLLMError("--plot needs matplotlib: pip install matplotlib (the plot extra)")
    result = benchmark.run(model, batches=args.batch or [1, 4, 16, 64], isl=args.isl, osl=args.osl or 256,
                           ttft_lens=args.ttft, iterations=args.iterations, dtype=args.dtype or "float16",
                           cuda_graphs=not args.no_cuda_graphs, cache_dir=args.cache_dir,
                           quantization=args.quantization, quantize_lm_head=args.quantize_lm_head)
    benchmark.print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.plot:
        from .bench_plot import plot_decode

        plot_decode([result], args.plot)
        print(f"wrote {args.plot}")
    return 0


def _bench_backends(args, model) -> int:
    from . import backend_bench
    from .models import resolve_model_dir

    if args.batch and len(args.batch) > 1:
        raise EdgeLLMError("--backend compares backends at one batch size: give one --batch")
    model = model if args.shape else str(resolve_model_dir(model))
    result = backend_bench.compare(model, args.backend, batch=(args.batch or [1])[0], isl=args.isl,
                                   osl=args.osl or 64, iterations=args.iterations, device=args.device,
                                   dtype=args.dtype, cache_dir=args.cache_dir)
    backend_bench.print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", "-q", action="store_true", help="no progress output (as EDGELLM_QUIET=1)")
    parser = argparse.ArgumentParser(prog="edgellm", description="Run LLMs with edgellm's Triton-kernel runtime.")
    parser.add_argument("--version", action="version", version=f"edgellm {__version__}")
    parser.add_argument("--quiet", "-q", action="store_true", dest="quiet_before", help="no progress output")
    sub = _QuietSubparsers(parser.add_subparsers(dest="command", required=True), quiet)

    p = sub.add_parser("generate", help="answer one prompt (chat template applied) and print it")
    p.add_argument("prompt", help='the prompt ("-": read it from stdin)')
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="an image for a vision-language model, placed before the prompt (repeatable)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="print tokens as they are produced (default; --no-stream prints the answer when done)")
    p.add_argument("--json", action="store_true", help="print the response as one JSON object instead")
    p.add_argument("--timings", action="store_true", help="print prefill/decode timings to stderr")
    p.add_argument("--show-accepted", action="store_true",
                   help="with speculative decoding: colour the tokens that came from accepted drafts (on a "
                        "terminal; the answer is printed when done) and print the speculation statistics")
    _add_model_options(p)
    _add_sampling_options(p, temperature_default=0.0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat, streaming the answers")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--timings", action="store_true", help="print each answer's prefill/decode timings to stderr")
    p.add_argument("--json", action="store_true", help="print each answer as one JSON line instead of streaming it")
    _add_model_options(p)
    _add_sampling_options(p, temperature_default=None)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("run", help="run a JSON batch of requests (format: README)")
    p.add_argument("--input", "-i", required=True, help='the batch file ("-": stdin)')
    p.add_argument("--output", "-o", required=True, help='where the responses go ("-": stdout)')
    _add_model_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="serve the model over HTTP (OpenAI and Anthropic APIs; the serve extra)",
                       description="An OpenAI- and Anthropic-compatible HTTP server on the continuous-batching "
                                   "engine loop: /v1/chat/completions, /v1/completions, /v1/models, /v1/messages, "
                                   "/health, /metrics.")
    add_serve_options(p)
    _add_model_options(p)
    p.set_defaults(func=lambda args: cmd_serve(args, _runtime))

    p = sub.add_parser("info", help="print a model's engine configuration")
    add_model_dir_argument(p, positional=True)
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--max-input-length", type=int, default=None)
    p.add_argument("--max-kv-cache-capacity", type=int, default=None)
    p.add_argument("--reduced-vocab-dir", default=None,
                   help="a vocab_map.safetensors directory (default: the model directory's, if it has one)")
    p.add_argument("--device", default=None, help="cpu or cuda (the dtype default depends on it)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    _quantization_options(p)
    p.set_defaults(func=cmd_info)

    add_writer_parsers(sub)  # quantize, export, reduce-vocab (cli_writers.py)

    p = sub.add_parser("bench", help="decode tokens/s and time to first token on the GPU",
                       description="Benchmark decode (tokens/s, ms per step, % of the bandwidth floor) and TTFT "
                                   "on a CUDA GPU, for a model directory or a named random-weight shape.")
    p.add_argument("--shape", default=None, help="random fp16 weights of a named shape: llama-3.2-1b, llama-3.1-8b, "
                                                 "smollm2-135m, gemma3-1b, gpt2-xl, phi4-mini")
    p.add_argument("--model-dir", "-m", default=None, help="a model directory instead of a named shape")
    p.add_argument("--isl", type=int, default=128, help="prompt length of the decode runs (default 128)")
    p.add_argument("--osl", type=int, default=None, help="decode steps per run (default 256; 64 with --backend)")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch sizes (default 1 4 16 64; one size with --backend, default 1)")
    p.add_argument("--ttft", type=int, nargs="*", default=[128, 1024, 4096], help="prompt lengths for TTFT")
    p.add_argument("--iterations", type=int, default=3, help="timed runs per figure, median (default 3)")
    p.add_argument("--dtype", default=None, help="default float16 (with --backend: float16 on CUDA, float32 on CPU)")
    p.add_argument("--backend", nargs="+", default=None, choices=BACKEND_CHOICES,
                   help="compare these engines on the same greedy generation instead (prefill ms, decode ms/step, "
                        "tokens/s, tokens equal to triton's); any device; the model defaults to the embedded one")
    p.add_argument("--device", default=None, help="with --backend: cpu or cuda (default: cuda when available)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly")
    p.add_argument("--cache-dir", default="/tmp/edgellm-bench", help="where random-weight models are written")
    _quantization_options(p)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="draw decode tokens/s per batch size against the bandwidth floor and (from bench/decode.py "
                        "results) the torch.compile baseline; "
                        "needs matplotlib (the 'plot' extra)")
    p.add_argument("--from", dest="plot_from", nargs="+", default=None, metavar="JSON",
                   help="with --plot: plot these saved results (edgellm bench --json or bench/decode.py --json) "
                        "instead of running the benchmark")
    p.set_defaults(func=cmd_bench)
    return parser


class _QuietSubparsers:
    """The subcommands' parsers, each taking --quiet / -q too (after the command, where users type it)."""

    def __init__(self, subparsers, quiet: argparse.ArgumentParser):
        self._subparsers, self._quiet = subparsers, quiet

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self._subparsers.add_parser(name, parents=[self._quiet], **kwargs)


def main(argv=None) -> int:
    from .engine.switches import set_progress_quiet

    args = build_parser().parse_args(argv)
    given = getattr(args, "model_dir_given", None)
    if given is not None:  # MODEL_DIR and --model-dir are the same option
        if args.model_dir not in (None, given):
            print(f"error: two model directories given ({given} and --model-dir {args.model_dir})", file=sys.stderr)
            return 2
        args.model_dir = given
    if args.quiet or args.quiet_before:
        set_progress_quiet()
    try:
        return args.func(args)
    except EdgeLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
