"""`edgellm quantize`: a full-precision model directory written back quantized (round to nearest),
so that later loads skip the quantization: each layer linear weight stored in formats.py's layout
(`<prefix>.qweight`, `.scales`, `.zeros` for int4), everything else as it was, config.json's
quantization_config saying {"quant_method": "edgellm", "kind", "group_size"} (and "int4_layout") (read by
quant/checkpoints.py), the tokenizer and generation files copied."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from ..errors import ConfigurationError, UnsupportedModelError
from ..progress import progress
from .checkpoints import save_packed
from .formats import GROUP_SIZE, INT4_LAYOUT, QUANT_KINDS, quantize


def write_quantized(model_dir: str | Path, output_dir: str | Path, kind: str, *, group: int = GROUP_SIZE) -> Path:
    from ..engine.config import EngineConfig
    from ..engine.weights import checkpoint_files, is_linear, read_checkpoint

    source, target = Path(model_dir), Path(output_dir)
    if kind not in QUANT_KINDS:
        raise ConfigurationError(f"unsupported quantization {kind!r}; supported: {', '.join(QUANT_KINDS)}")
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
    raw = read_checkpoint(source, cfg)
    tensors = {}
    for name in progress(list(raw), desc=f"quantizing to {kind}", unit="tensor"):
        tensor = raw.pop(name)
        if is_linear(name, tuple(tensor.shape)):
            tensors.update(save_packed(quantize(tensor, kind, group=group), name.removesuffix(".weight")))
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
