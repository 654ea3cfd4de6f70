"""`edgellm` subcommands that write a new model directory: quantize, export (ONNX) and reduce-vocab.
Thin wrappers like the rest of cli.py: parse, call the public API, print where the result went."""

from __future__ import annotations

import json

MODEL_DIR_HELP = "model directory (default: the embedded SmolLM2-135M-Instruct)"


def add_model_dir_argument(p, positional: bool = False) -> None:
    """--model-dir / -m, as every command takes it; positional: a bare MODEL_DIR too (info, quantize, export)."""
    p.add_argument("--model-dir", "-m", default=None, help=MODEL_DIR_HELP)
    if positional:
        p.add_argument("model_dir_given", nargs="?", default=None, metavar="MODEL_DIR", help="the same as --model-dir")


def cmd_quantize(args) -> int:
    from .models import resolve_model_dir
    from .quant.export import write_quantized

    target = write_quantized(resolve_model_dir(args.model_dir), args.output, args.to, group=args.group_size,
                             method=args.method, calibration_text=args.calibration, device=args.device)
    print(f"wrote {args.to} weights to {target}; load it like any model directory")
    return 0


def cmd_export(args) -> int:
    from .export import export_onnx

    target = export_onnx(args.model_dir, args.output, dtype=args.dtype, max_batch_size=args.max_batch_size,
                         max_input_length=args.max_input_length, max_kv_cache_capacity=args.max_kv_cache_capacity,
                         overwrite=args.overwrite)
    print(f"wrote an ONNX decoder to {target}; run it with `edgellm generate -m {target} PROMPT` or "
          f"LLMEngineRunner({str(target)!r}, backend='onnxruntime')")
    return 0


def cmd_reduce_vocab(args) -> int:
    from .vocab import reduce_vocab
    from .vocab.reduce import stderr_progress

    result = reduce_vocab(args.model_dir, args.corpus, args.size, args.method, output=args.output,
                          max_samples=args.max_samples, tolerance=args.tolerance, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, device=args.device, progress=stderr_progress)
    print(json.dumps(result.info, indent=1))
    return 0


def add_writer_parsers(sub) -> None:
    """The quantize, export and reduce-vocab subcommands, on cli.py's subparsers."""
    p = sub.add_parser("quantize", help="write a model directory back with quantized weights",
                       description="Quantize a full-precision model's layer weights and write a model directory "
                                   "that later loads already quantized: int8 and fp8 round to nearest; int4 by "
                                   "default runs GPTQ calibrated on a short prose text shipped with edgellm "
                                   "(+28% perplexity against round to nearest's +65% on the default model).")
    add_model_dir_argument(p, positional=True)
    p.add_argument("--to", required=True, choices=("int8", "int4", "fp8"))
    p.add_argument("--output", "-o", required=True, help="an empty or new directory")
    p.add_argument("--group-size", type=int, default=128, help="int4 group along the input (multiple of 32; default 128)")
    p.add_argument("--method", choices=("rtn", "gptq"), default=None,
                   help="rtn: round to nearest; gptq: calibrated error compensation (int4 only; its default)")
    p.add_argument("--calibration", default=None, help="a text file to calibrate GPTQ on (default: the shipped prose)")
    p.add_argument("--device", default=None, help="where GPTQ runs the model (default: cuda if available, else cpu)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="export a model as an ONNX decoder graph (run by the onnxruntime backend)",
                       description="Write an ONNX graph of the decoder (input embeddings, context lengths and the "
                                   "KV cache in; last-token logits and the updated cache out) with its embedding "
                                   "table, tokenizer, config and an I/O description (edgellm_engine.json). The "
                                   "base model only (no LoRA). Model types: llama, mistral, qwen2, qwen3.")
    add_model_dir_argument(p, positional=True)
    p.add_argument("--output", "-o", required=True, help="an empty or new directory")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="the graph's weights and activations (default float32; logits are float32 always)")
    p.add_argument("--max-batch-size", type=int, default=None, help="engine limit (default 4)")
    p.add_argument("--max-input-length", type=int, default=None, help="engine limit (default 1024)")
    p.add_argument("--max-kv-cache-capacity", type=int, default=None, help="engine limit (default 2048)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("reduce-vocab", help="build a reduced-vocabulary map (vocab_map.safetensors) from a corpus",
                       description="Choose the token ids a domain needs: the runtime then computes logits over "
                                   "those only (a smaller LM head). Special, chat-template and byte tokens are "
                                   "always kept. Corpus: .txt (a sample per line), .jsonl (text, messages, or "
                                   "prompt + response) or a directory of them.")
    p.add_argument("--model-dir", "--model", "-m", default=None, help=MODEL_DIR_HELP)
    p.add_argument("--corpus", required=True)
    p.add_argument("--size", type=int, required=True, help="ids in the reduced vocabulary")
    p.add_argument("--method", default="input_aware", choices=["frequency", "input_aware", "self"],
                   help="input_aware (default): response tokens found in their inputs first, then by frequency; "
                        "frequency: by frequency; self: input_aware over the model's own greedy answers")
    p.add_argument("--output", "-o", required=True, help="directory for vocab_map.safetensors and reduced_vocab.json")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--tolerance", type=float, default=0.02,
                   help="share of the budget kept for ids adjacent to chosen ones (input_aware, self; default 0.02)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="method self: answer length (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="method self: answers generated at once (default 8)")
    p.add_argument("--device", default=None, help="method self: where the model runs (default: cuda if present)")
    p.set_defaults(func=cmd_reduce_vocab)
