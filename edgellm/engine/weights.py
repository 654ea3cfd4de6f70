"""Load an HF checkpoint (safetensors, single or sharded) into the tensors the decoder uses.

Names follow the HF layout (model.layers.N.self_attn.q_proj.weight, ...). q/k/v are fused into one
[q + 2 * kv, hidden] matrix and gate/up into one [2 * ffn, hidden] matrix at load time, so each
block runs two fewer matmuls. Every tensor's shape is checked against the config before use.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import ModelLoadError
from ..progress import progress
from . import gpt2
from .config import EngineConfig


@dataclasses.dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor        # gate and up stacked; a plain MLP's fc
    down: torch.Tensor
    # LayerNorm / plain-MLP families (GPT-2) only:
    input_norm_bias: torch.Tensor | None = None
    post_norm_bias: torch.Tensor | None = None
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


@dataclasses.dataclass
class ModelWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # the same tensor as `embed` when embeddings are tied
    final_norm_bias: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # learned absolute positions [max_positions, hidden] (GPT-2)


def expected_shapes(cfg: EngineConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor edgellm reads, by HF name, with its required shape."""
    if cfg.model_type == gpt2.MODEL_TYPE:
        return gpt2.expected_shapes(cfg)
    h, d = cfg.hidden_size, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_decoder_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (cfg.q_size, h),
            p + "self_attn.k_proj.weight": (cfg.kv_size, h),
            p + "self_attn.v_proj.weight": (cfg.kv_size, h),
            p + "self_attn.o_proj.weight": (h, cfg.q_size),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
        })
        if cfg.model_type == "phi3":  # Phi-3 stores q/k/v and gate/up fused, in the order we fuse them
            for split in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
                del shapes[p + split + ".weight"]
            shapes.update({p + "self_attn.qkv_proj.weight": (cfg.q_size + 2 * cfg.kv_size, h),
                           p + "mlp.gate_up_proj.weight": (2 * cfg.intermediate_size, h)})
        if cfg.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (cfg.q_size,),
                           p + "self_attn.k_proj.bias": (cfg.kv_size,),
                           p + "self_attn.v_proj.bias": (cfg.kv_size,)})
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
    return shapes


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
    """The tensors `expected_shapes` names, on CPU in their stored dtype, all shapes verified."""
    wanted = expected_shapes(cfg)
    found: dict[str, torch.Tensor] = {}
    files = checkpoint_files(model_dir)
    for path in progress(files, desc="loading weights", unit="file") if len(files) > 1 else files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for stored in f.keys():
                    name = language_name(stored)
                    if name not in wanted and "transformer." + name in wanted:  # GPT-2 saved bare ("h.0...")
                        name = "transformer." + name
                    if name in wanted:
                        found[name] = f.get_tensor(stored)
        except Exception as exc:  # safetensors raises several types for truncated/corrupt files
            raise ModelLoadError(f"cannot read weights from {path}: {exc}") from exc
    missing = [n for n in wanted if n not in found]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"checkpoint in {model_dir} is missing tensors: {', '.join(missing[:5])}{more}")
    for name, shape in wanted.items():
        if tuple(found[name].shape) != shape:
            raise ModelLoadError(f"tensor {name} has shape {tuple(found[name].shape)}, the config needs {shape}")
    return found


def load_weights(model_dir: str | Path, cfg: EngineConfig, *, dtype: torch.dtype,
                 device: torch.device) -> ModelWeights:
    raw = read_checkpoint(Path(model_dir), cfg)

    def take(name: str) -> torch.Tensor:
        return raw.pop(name).to(device=device, dtype=dtype).contiguous()

    def fused(*names: str) -> torch.Tensor:
        return torch.cat([raw.pop(n) for n in names], dim=0).to(device=device, dtype=dtype).contiguous()

    if cfg.model_type == gpt2.MODEL_TYPE:
        layers, embed, lm_head, final, final_bias, positions = gpt2.load(
            cfg, take, lambda name: raw.pop(name).t().to(device=device, dtype=dtype).contiguous())
        return ModelWeights(embed=embed, layers=layers, final_norm=final, lm_head=lm_head, final_norm_bias=final_bias,
                            positions=positions)
    layers = []
    for i in range(cfg.num_decoder_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        layers.append(LayerWeights(
            input_norm=take(p + "input_layernorm.weight"),
            qkv=take(a + "qkv_proj.weight") if cfg.model_type == "phi3" else
            fused(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
            qkv_bias=fused(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias") if cfg.qkv_bias else None,
            o_proj=take(a + "o_proj.weight"),
            o_bias=take(a + "o_proj.bias") if cfg.o_bias else None,
            q_norm=take(a + "q_norm.weight") if cfg.qk_norm else None,
            k_norm=take(a + "k_norm.weight") if cfg.qk_norm else None,
            post_norm=take(p + "post_attention_layernorm.weight"),
            gate_up=take(p + "mlp.gate_up_proj.weight") if cfg.model_type == "phi3" else
            fused(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
            down=take(p + "mlp.down_proj.weight"),
        ))
    embed = take("model.embed_tokens.weight")
    lm_head = embed if cfg.tie_word_embeddings else take("lm_head.weight")
    return ModelWeights(embed=embed, layers=layers, final_norm=take("model.norm.weight"), lm_head=lm_head)
