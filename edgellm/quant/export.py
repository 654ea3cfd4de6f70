"""`edgellm quantize`: a full-precision model directory written back quantized (round to nearest, or
for int4 by default GPTQ calibrated on the shipped prose, quant/gptq.py), so that later loads skip the
quantization: each layer linear weight stored in formats.py's layout
(`<prefix>.qweight`, `.scales`, `.zeros` for int4), everything else as it was, config.json's
quantization_config saying {"quant_method": "edgellm", "kind", "group_size"} (and "int4_layout") (read by
quant/checkpoints.py), the tokenizer and generation files copied."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ConfigurationError, UnsupportedModelError
from ..progress import progress
from .checkpoints import save_packed
from .formats import GROUP_SIZE, INT4_LAYOUT, QUANT_KINDS, quantize

log = logging.getLogger("edgellm")


METHODS = ("rtn", "gptq")
# A checkpoint tensor's projection (quant/gptq.py quantize_projection): layer index, projection name.
_PROJECTION = re.compile(r"layers\.(\d+)\..*\b(q|k|v|qkv|o|gate|up|gate_up|down)_proj\.weight$")
_FIELD = {"q": "qkv", "k": "qkv", "v": "qkv", "qkv": "qkv", "o": "o_proj", "gate": "gate_up", "up": "gate_up",
          "gate_up": "gate_up", "down": "down"}


def write_quantized(model_dir: str | Path, output_dir: str | Path, kind: str, *, group: int = GROUP_SIZE,
                    method: str | None = None, calibration_text: str | Path | None = None,
                    device: str | None = None) -> Path:
    """method: "rtn" (round to nearest) or "gptq" (int4 only; the default for int4), calibrated on
    calibration_text (default: the prose the package ships) with the model run on `device` (default
    cuda when there is one)."""
    from ..engine.config import EngineConfig
    from ..engine.weights import checkpoint_files, is_linear, read_checkpoint

    source, target = Path(model_dir), Path(output_dir)
    if kind not in QUANT_KINDS:
        raise ConfigurationError(f"unsupported quantization {kind!r}; supported: {', '.join(QUANT_KINDS)}")
    method = method or ("gptq" if kind == "int4" else "rtn")
    if method not in METHODS or (method == "gptq" and kind != "int4"):
        raise ConfigurationError(f"method {method!r} does not quantize to {kind}: rtn does every kind, gptq int4")
    if group < 32 or group % 32:
        raise ConfigurationError(f"group size must be a positive multiple of 32, got {group}")
    if target.resolve() == source.resolve():
        raise ConfigurationError("the output directory must differ from the model directory")
    if target.exists() and any(target.iterdir()):
        raise ConfigurationError(f"output directory {target} exists and is not empty")
    cfg = EngineConfig.from_model_dir(source)
    if cfg.quant_method:
        raise ConfigurationError(f"{source} is already quantized ({cfg.quant_method} {cfg.quantization})")
    if cfg.mlp != "gated" or cfg.multimodal:
        raise UnsupportedModelError(f"edgellm quantize supports the text models with gated MLPs, not {cfg.model_type}"
                                    f"{' (' + cfg.multimodal + ')' if cfg.multimodal else ''}; use quantization= at load")
    hessians = _calibration(source, calibration_text, device) if method == "gptq" else None
    raw = read_checkpoint(source, cfg)
    tensors = {}
    for name in progress(list(raw), desc=f"quantizing to {kind} ({method})", unit="tensor"):
        tensor = raw.pop(name)
        if is_linear(name, tuple(tensor.shape)):
            packed = _gptq(name, tensor, hessians, cfg, group) if hessians else quantize(tensor, kind, group=group)
            tensors.update(save_packed(packed, name.removesuffix(".weight")))
        else:
            tensors[name] = tensor.contiguous()
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "edgellm", "kind": kind, "group_size": group}
    if kind == "int4":
        config["quantization_config"]["int4_layout"] = INT4_LAYOUT
    (target / "config.json").write_text(json.dumps(config, indent=2))
    shards = {f.name for f in checkpoint_files(source)}
    for file in source.iterdir():  # tokenizer, generation config, chat template, a vocabulary map ...
        if file.is_file() and file.name not in shards | {"config.json", "model.safetensors.index.json"}:
            shutil.copy2(file, target / file.name)
    return target


def _calibration(source: Path, text: str | Path | None, device: str | None) -> dict[tuple[int, str], torch.Tensor]:
    """H of each layer's projection inputs over the calibration text: {(layer, engine field): H}."""
    from tokenizers import Tokenizer

    from ..engine.runner import LLMEngineRunner
    from ..engine.weights import LINEAR_FIELDS
    from .gptq import CALIBRATION_TEXT, calibrate

    path = Path(text) if text else CALIBRATION_TEXT
    if not path.is_file():
        raise ConfigurationError(f"calibration text {path} not found")
    if not (source / "tokenizer.json").is_file():
        raise ConfigurationError(f"{source} has no tokenizer.json to read the calibration text with")
    ids = Tokenizer.from_file(str(source / "tokenizer.json")).encode(path.read_text()).ids
    if len(ids) < 64:
        raise ConfigurationError(f"calibration text {path} has {len(ids)} tokens; give at least 64")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    log.info("calibrating on %d tokens of %s (%s)", len(ids), path.name, device)
    window = 512
    runner = LLMEngineRunner(source, device=device, dtype="float32", cuda_graphs=False, max_batch_size=1,
                             max_input_length=window, max_kv_cache_capacity=window)
    window = min(window, runner.config.max_supported_input_length)
    hessians = calibrate(runner, ids, window=window)
    return {(i, field): hessians[id(getattr(layer, field))].to("cpu")
            for i, layer in enumerate(runner.weights.layers) for field in LINEAR_FIELDS}


def _gptq(name: str, tensor: torch.Tensor, hessians, cfg, group: int):
    """One checkpoint linear weight through quant/gptq.py's policy, under its layer's H."""
    from .gptq import quantize_layer_weight, quantize_projection

    match = _PROJECTION.search(name)
    if match is None:  # a layer linear weight of an unknown name: round to nearest
        return quantize(tensor, "int4", group=group)
    layer, projection = int(match.group(1)), match.group(2)
    hessian = hessians[(layer, _FIELD[projection])]
    if projection == "qkv":  # stored fused (Phi-3): the engine's row blocks
        return quantize_layer_weight("qkv", tensor, hessian, cfg, group=group)
    return quantize_projection(projection, tensor, hessian, group=group)
