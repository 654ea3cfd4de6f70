"""`edgellm export`: a model directory -> an ONNX decoder graph plus everything a runner needs beside it.

Written to the output directory:
  model.onnx, model.onnx.data  the decoder (export/decoder.py: embeddings in, KV cache in and out,
                               last-token logits out), weights as ONNX external data
  embedding.safetensors        the input embedding table ("embed"): the lookup stays outside the graph
  edgellm_engine.json          what the graph is: its inputs and outputs (names, dtypes, shapes with
                               named dynamic axes), dtype, opset, exporter, the model's dimensions and
                               the limits an engine is built for (TensorRT's optimization profiles)
  config.json, tokenizer and generation files copied from the model directory

Exporter: torch.onnx's dynamo (torch.export-based) exporter, opset 18. It is the exporter torch
maintains (the TorchScript one is deprecated since torch 2.9), it turns the decoder's dynamic axes
into named ONNX dimensions from torch.export's symbolic shapes, and opset 18 is its lowest. Every op
the graph holds (MatMul, ScatterND, Gather/GatherND, Softmax, Cos/Sin, Range, Where, ...) is a
standard ONNX op both onnxruntime and TensorRT 10's parser take; no custom or contrib ops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigurationError, ExportError, UnsupportedModelError
from ..engine.backends.export_format import (EMBEDDING_FILE, ENGINE_JSON, FORMAT_VERSION, ONNX_DTYPES, ONNX_FILE,
                                             DYNAMIC_AXES, io_spec)
from ..engine.config import EngineConfig
from ..engine.devices import resolve_dtype
from ..kernels.rope import rope_inv_freq

EXPORT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
OPSET = 18
# Files of the model directory a runtime reads beside the weights (copied when present).
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


def check_exportable(cfg: EngineConfig) -> None:
    """UnsupportedModelError unless the decoder graph (export/decoder.py) computes this model exactly."""
    if cfg.model_type not in EXPORT_MODEL_TYPES:
        raise UnsupportedModelError(f"export supports model types {', '.join(EXPORT_MODEL_TYPES)}; this model is "
                                    f"{cfg.model_type!r} (it runs on the triton backend)")
    unsupported = [what for what, present in (
        ("multimodal (vision-language) models", cfg.multimodal is not None),
        ("multimodal RoPE", cfg.mrope_section is not None),
        ("LongRoPE scaling", (cfg.rope_scaling or {}).get("rope_type") == "longrope"),
        ("quantized weights", cfg.quantization is not None or cfg.quant_method is not None)) if present]
    if unsupported:
        raise UnsupportedModelError(f"export does not support {', '.join(unsupported)} (this model: "
                                    f"{cfg.model_type}); it runs on the triton backend")


def _example_inputs(cfg: EngineConfig, dtype: torch.dtype) -> tuple:
    # Distinct sizes per dynamic axis (torch.export would take two equal sizes for one symbol) and
    # none of them 0 or 1 (which it would specialise).
    rows, seq, max_batch, capacity = 3, 5, 6, 13
    past = torch.tensor([0, 6, 2], dtype=torch.int32)
    context = torch.tensor([5, 11, 4], dtype=torch.int32)
    cache = [torch.zeros(2, max_batch, cfg.num_kv_heads, capacity, cfg.head_dim, dtype=dtype)
             for _ in range(cfg.num_decoder_layers)]
    return (torch.randn(rows, seq, cfg.hidden_size).to(dtype), past, context, torch.tensor([4, 0, 2], dtype=torch.int32),
            torch.arange(int(context.max()), dtype=torch.int32), *cache)


def _dynamic_shapes(layers: int):
    from torch.export import Dim

    batch, seq, keys, max_batch, capacity = (Dim(n) for n in DYNAMIC_AXES)
    return ({0: batch, 1: seq}, {0: batch}, {0: batch}, {0: batch}, {0: keys},
            tuple({1: max_batch, 3: capacity} for _ in range(layers)))


def export_onnx(model_dir: str | Path | None, output_dir: str | Path, *, dtype: str | torch.dtype = "float32",
                max_batch_size: int | None = None, max_input_length: int | None = None,
                max_kv_cache_capacity: int | None = None, overwrite: bool = False,
                progress: Callable[[str], None] | None = None) -> Path:
    """Export the model in `model_dir` (None: the embedded default model) into `output_dir` (new or
    empty, unless overwrite) and return that directory. dtype: the graph's weights and activations
    (float32, float16 or bfloat16; logits are float32 either way). The three limits are the engine's
    (defaults as LLMEngineRunner's): recorded in edgellm_engine.json, the maximum of the TensorRT
    optimization profiles and of a runner built on this export. LoRA adapters are not exported.
    """
    from ..models import resolve_model_dir
    from ..engine.weights import load_weights
    from .decoder import ExportDecoder

    say = progress or (lambda message: print(message, file=sys.stderr))
    model_dir = resolve_model_dir(model_dir)
    output = Path(output_dir)
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not overwrite)):
        raise ExportError(f"{output} exists and is not an empty directory (pass overwrite=True / --overwrite)")
    try:
        dtype = resolve_dtype(dtype, torch.device("cpu"))
    except ConfigurationError as exc:
        raise ExportError(f"export dtype must be float32, float16 or bfloat16, got {dtype!r}") from exc
    cfg = EngineConfig.from_model_dir(model_dir, max_batch_size=max_batch_size, max_input_length=max_input_length,
                                      max_kv_cache_capacity=max_kv_cache_capacity)
    check_exportable(cfg)
    onnx_modules = _onnx_modules()
    started = time.perf_counter()
    say(f"edgellm export: loading {model_dir} ({cfg.model_type}, {cfg.num_decoder_layers} layers, {dtype})")
    weights = load_weights(model_dir, cfg, dtype=dtype, device=torch.device("cpu"))
    decoder = ExportDecoder(weights, cfg, rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling)).eval()
    spec = io_spec(cfg, dtype)
    say("edgellm export: tracing the decoder with torch.onnx (dynamo exporter, opset "
        f"{OPSET}); a large model takes minutes")
    # The exporter reports its stages on stdout and warns about its own internals: both go to stderr
    # (or nowhere), so stdout stays the caller's.
    with torch.no_grad(), contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings(), _quiet("torch.onnx"):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                decoder, _example_inputs(cfg, dtype), dynamo=True, opset_version=OPSET,
                input_names=[i["name"] for i in spec["inputs"]], output_names=[o["name"] for o in spec["outputs"]],
                dynamic_shapes=_dynamic_shapes(cfg.num_decoder_layers), verbose=False)
        except Exception as exc:  # the exporter's own errors are many and version-specific
            raise ExportError(f"torch.onnx could not export this model ({type(exc).__name__}: {exc})") from exc
    output.mkdir(parents=True, exist_ok=True)
    for stale in (ONNX_FILE, ONNX_FILE + ".data"):
        (output / stale).unlink(missing_ok=True)
    say(f"edgellm export: writing {output / ONNX_FILE}")
    program.save(str(output / ONNX_FILE), external_data=True)
    _name_axes(onnx_modules, output / ONNX_FILE, spec)
    from safetensors.torch import save_file

    save_file({"embed": weights.embed.contiguous()}, str(output / EMBEDDING_FILE))
    for name in COPIED_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, output / name)
    description = dict(
        format=FORMAT_VERSION, exporter=f"torch.onnx dynamo (torch {torch.__version__})", opset=OPSET,
        dtype=ONNX_DTYPES[dtype], source=str(model_dir), lora="not exported (base model only)",
        onnx=ONNX_FILE, embedding=EMBEDDING_FILE,
        model=dict(model_type=cfg.model_type, num_decoder_layers=cfg.num_decoder_layers,
                   hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                   num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size),
        limits=dict(max_batch_size=cfg.max_supported_batch_size, max_input_length=cfg.max_supported_input_length,
                    max_kv_cache_capacity=cfg.max_kv_cache_capacity),
        **spec)
    (output / ENGINE_JSON).write_text(json.dumps(description, indent=1) + "\n")
    say(f"edgellm export: done in {time.perf_counter() - started:.1f} s -> {output}")
    return output


@contextlib.contextmanager
def _quiet(logger: str):
    """The logger's warnings off for a while (torch.onnx logs every optional op library it skips)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _onnx_modules():
    """The onnx module; ExportError when it or onnxscript (torch.onnx's dynamo exporter needs both) is missing."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"export needs the {' and '.join(missing)} package(s); install the onnx extra "
                          "(pip install -e \".[onnx]\" in a checkout)")
    import onnx
    return onnx


def _name_axes(onnx, path: Path, spec: dict) -> None:
    """Give the graph's dynamic axes the names of edgellm_engine.json (the exporter names them after
    torch.export's symbols, which differ between torch versions); weights stay in the external file."""
    model = onnx.load(str(path), load_external_data=False)
    for values, wanted in ((model.graph.input, spec["inputs"]), (model.graph.output, spec["outputs"])):
        by_name = {v.name: v for v in values}
        for item in wanted:
            dims = by_name[item["name"]].type.tensor_type.shape.dim
            for dim, size in zip(dims, item["shape"]):
                if isinstance(size, str):
                    dim.ClearField("dim_value")
                    dim.dim_param = size
    onnx.save(model, str(path))
