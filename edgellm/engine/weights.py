"""Load an HF checkpoint (safetensors, single or sharded) into the tensors the decoder uses.

Which tensors, under which names, fused or transposed how, is the model family's word
(engine/families/); this file reads the files, checks every tensor's shape against the config
before use, and moves them to the device in the engine dtype.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ModelLoadError
from ..progress import progress
from ..quant.checkpoints import checkpoint_quantization, packed_names, unpack
from ..quant.formats import QuantizedWeight, packed_bytes, quantize
from .config import EngineConfig
from .families import family


@dataclasses.dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor | QuantizedWeight  # the four linear weights may be packed (edgellm/quant)
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor | QuantizedWeight
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor | QuantizedWeight  # gate and up stacked; a plain MLP's fc
    down: torch.Tensor | QuantizedWeight
    # LayerNorm / plain-MLP families (GPT-2) only:
    input_norm_bias: torch.Tensor | None = None
    post_norm_bias: torch.Tensor | None = None
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    # Sandwich norms (Gemma): RMSNorm of the attention / MLP output before its residual add.
    attn_out_norm: torch.Tensor | None = None
    mlp_out_norm: torch.Tensor | None = None


@dataclasses.dataclass
class ModelWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor | QuantizedWeight  # the same tensor as `embed` when tied (and not quantized)
    final_norm_bias: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # learned absolute positions [max_positions, hidden] (GPT-2)


def expected_shapes(cfg: EngineConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor edgellm reads, by HF name, with its required shape."""
    return family(cfg.model_type).expected_shapes(cfg)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot read {index}: {exc}") from exc
        files = sorted({model_dir / name for name in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no *.safetensors weights (only safetensors checkpoints are supported)")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"weight shards listed in the index are missing: {', '.join(missing)}")
    return files


# A vision-language checkpoint keeps its language model under a prefix, which depends on the
# family and on the transformers version that saved it: each maps onto the text model's names.
LANGUAGE_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                     ("language_model.lm_head.", "lm_head."), ("model.lm_head.", "lm_head."))


def language_name(name: str) -> str:
    for prefix, canonical in LANGUAGE_PREFIXES:
        if name.startswith(prefix):
            return canonical + name[len(prefix):]
    return name


def read_checkpoint(model_dir: Path, cfg: EngineConfig) -> dict[str, torch.Tensor]:
    """The tensors `expected_shapes` names, on CPU in their stored dtype, all shapes verified; for a
    checkpoint quantized elsewhere (cfg.quant_method), its linear weights as QuantizedWeights."""
    wanted = expected_shapes(cfg)
    packed = {}  # stored name -> the linear weight it belongs to (AWQ / GPTQ)
    if cfg.quant_method:
        for name, shape in list(wanted.items()):
            if is_linear(name, shape):
                packed.update({part: name for part in packed_names(name, cfg.quant_method)})
    parts: dict[str, torch.Tensor] = {}
    found: dict[str, torch.Tensor] = {}
    files = checkpoint_files(model_dir)
    for path in progress(files, desc="loading weights", unit="file") if len(files) > 1 else files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for stored in f.keys():
                    name = language_name(stored)
                    if name not in wanted and "transformer." + name in wanted:  # GPT-2 saved bare ("h.0...")
                        name = "transformer." + name
                    if name in packed:
                        parts[name] = f.get_tensor(stored)
                    elif name in wanted and name not in packed.values():
                        found[name] = f.get_tensor(stored)
        except Exception as exc:  # safetensors raises several types for truncated/corrupt files
            raise ModelLoadError(f"cannot read weights from {path}: {exc}") from exc
    if packed:
        found.update(_unpack_linear(cfg, wanted, packed, parts, model_dir))
    missing = [n for n in wanted if n not in found]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"checkpoint in {model_dir} is missing tensors: {', '.join(missing[:5])}{more}")
    for name, shape in wanted.items():
        if tuple(found[name].shape) != shape:
            raise ModelLoadError(f"tensor {name} has shape {tuple(found[name].shape)}, the config needs {shape}")
    return found


def _unpack_linear(cfg: EngineConfig, wanted, packed, parts, model_dir) -> dict[str, QuantizedWeight]:
    spec = checkpoint_quantization(json.loads((Path(model_dir) / "config.json").read_text()))
    out = {}
    for name in dict.fromkeys(packed.values()):
        names = packed_names(name, cfg.quant_method)
        required = names[:2] if cfg.quant_method == "edgellm" and cfg.quantization == "fp8" else names[:3]
        missing = [n for n in required if n not in parts]
        if missing:
            raise ModelLoadError(f"checkpoint in {model_dir} is missing tensors: {', '.join(missing)}")
        shape = wanted[name]
        out[name] = unpack(spec, name, [parts.get(n) for n in names], shape[0], shape[1])
    return out


class Tensors:
    """A checkpoint's tensors as a family's load() takes them: each moved to the device in the
    engine dtype, optionally transformed first (in float32, e.g. Gemma's 1 + w), fused with others
    along dim 0, or transposed (GPT-2's Conv1D). With a quantization, the layers' linear weights
    (is_linear; the LM head too with quantize_lm_head) are packed instead, from their stored values
    on the device, one matrix at a time: the full-precision model never sits on the device whole, and
    the codes do not depend on the compute dtype."""

    def __init__(self, raw: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                 quantization: str | None = None, quantize_lm_head: bool = False):
        self.raw, self.dtype, self.device = raw, dtype, device
        self.quantization, self.quantize_lm_head = quantization, quantize_lm_head

    def _place(self, tensor, name: str):
        if isinstance(tensor, QuantizedWeight):  # stored packed (AWQ / GPTQ): scales in the compute dtype
            zeros = None if tensor.zeros is None else tensor.zeros.to(self.device, self.dtype)
            return dataclasses.replace(tensor.to(self.device), scales=tensor.scales.to(self.device, self.dtype),
                                       zeros=zeros)
        if self.quantization and (is_linear(name, tuple(tensor.shape)) or (self.quantize_lm_head and "lm_head" in name)):
            return quantize(tensor.to(self.device), self.quantization, dtype=self.dtype)
        return tensor.to(device=self.device, dtype=self.dtype).contiguous()

    def take(self, name: str, transform=None):
        tensor = self.raw.pop(name)
        return self._place(transform(tensor) if transform is not None else tensor, name)

    def fused(self, *names: str):
        parts = [self.raw.pop(n) for n in names]
        if isinstance(parts[0], QuantizedWeight):  # packed rows stack as they are
            return self._place(dataclasses.replace(parts[0], **{f: torch.cat([getattr(p, f) for p in parts])
                                                              for f in ("data", "scales", "zeros")
                                                              if getattr(parts[0], f) is not None}), names[0])
        return self._place(torch.cat(parts, dim=0), names[0])

    def transposed(self, name: str):
        return self._place(self.raw.pop(name).t(), name)


LINEAR_FIELDS = ("qkv", "o_proj", "gate_up", "down")  # the LayerWeights that quantization packs


def is_linear(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a checkpoint tensor is a layer's linear weight (what quantization packs): the 2-D
    tensors other than the embeddings and the LM head."""
    return len(shape) == 2 and not any(part in name for part in ("embed", "wte", "wpe", "lm_head"))


def weight_bytes(cfg: EngineConfig, dtype: torch.dtype) -> int:
    """Bytes the engine's weights take on the device, packed ones counted packed."""
    el = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for name, shape in expected_shapes(cfg).items():
        packed = cfg.quantization and (is_linear(name, shape) or (cfg.quantize_lm_head and "lm_head" in name))
        total += packed_bytes(cfg.quantization, *shape, el, cfg.quant_group or shape[-1]) if packed \
            else math.prod(shape) * el
    if cfg.quantization and cfg.quantize_lm_head and cfg.tie_word_embeddings:  # a packed copy of the table
        total += packed_bytes(cfg.quantization, cfg.vocab_size, cfg.hidden_size, el)
    return total


def load_weights(model_dir: str | Path, cfg: EngineConfig, *, dtype: torch.dtype,
                 device: torch.device) -> ModelWeights:
    raw = read_checkpoint(Path(model_dir), cfg)
    weights = family(cfg.model_type).load(cfg, Tensors(raw, dtype, device, cfg.quantization, cfg.quantize_lm_head))
    if cfg.quantize_lm_head and cfg.tie_word_embeddings:  # the embedding stays whole; the head is a packed copy
        weights.lm_head = quantize(weights.embed, cfg.quantization)
    return weights
