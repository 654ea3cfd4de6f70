"""What a directory `edgellm export` writes holds (the writer is edgellm/export/, the readers are the
exported backends here): file names, edgellm_engine.json's format, and the graph's inputs/outputs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ...errors import ModelLoadError, read_json
from ..config import EngineConfig

FORMAT_VERSION = 1
ONNX_FILE = "model.onnx"
EMBEDDING_FILE = "embedding.safetensors"
ENGINE_JSON = "edgellm_engine.json"
ONNX_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
DYNAMIC_AXES = ("batch", "seq", "keys", "max_batch", "capacity")


def io_spec(cfg: EngineConfig, dtype: torch.dtype) -> dict:
    """The graph's inputs and outputs as edgellm_engine.json lists them: name, dtype, shape (ints for
    fixed axes, names for the dynamic ones of DYNAMIC_AXES)."""
    kv = [2, "max_batch", cfg.num_kv_heads, "capacity", cfg.head_dim]
    name = ONNX_DTYPES[dtype]
    inputs = [dict(name="inputs_embeds", dtype=name, shape=["batch", "seq", cfg.hidden_size])]
    inputs += [dict(name=n, dtype="int32", shape=["batch"]) for n in ("past_lengths", "context_lengths", "slots")]
    inputs += [dict(name="kv_positions", dtype="int32", shape=["keys"])]
    inputs += [dict(name=f"past_key_values.{i}", dtype=name, shape=kv) for i in range(cfg.num_decoder_layers)]
    outputs = [dict(name="logits", dtype="float32", shape=["batch", cfg.vocab_size])]
    outputs += [dict(name=f"present_key_values.{i}", dtype=name, shape=kv) for i in range(cfg.num_decoder_layers)]
    return dict(inputs=inputs, outputs=outputs)


def is_export(model_dir: str | Path) -> bool:
    """Whether `model_dir` is a directory `edgellm export` wrote (run by an exported backend)."""
    return (Path(model_dir) / ENGINE_JSON).is_file()


def read_engine_json(export_dir: Path) -> dict:
    """edgellm_engine.json of an export directory (ModelLoadError-family errors when missing or bad)."""
    path = Path(export_dir) / ENGINE_JSON
    if not path.is_file():
        raise ModelLoadError(f"{export_dir} is not an edgellm export (no {ENGINE_JSON}): run "
                             f"`edgellm export MODEL --output {export_dir}` first")
    description = read_json(path, ModelLoadError)
    if description.get("format") != FORMAT_VERSION:
        raise ModelLoadError(f"{path} is format {description.get('format')!r}; this edgellm reads format "
                             f"{FORMAT_VERSION}: export the model again")
    return description


def engine_matches_config(description: dict, cfg: EngineConfig) -> list[str]:
    """What in an export's description disagrees with the model config beside it (empty: nothing)."""
    wanted = dataclasses.asdict(cfg)
    return [f"{key}: graph {value}, config {wanted[key]}" for key, value in description["model"].items()
            if wanted.get(key) != value]
