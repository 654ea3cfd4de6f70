"""EngineConfig: the LLMEngineRunnerConfig analog, read from an HF config.json."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import ConfigurationError, ModelLoadError, UnsupportedModelError, read_json
from ..kernels.rope import SUPPORTED_ROPE_TYPES
from ..quant.checkpoints import checkpoint_quantization
from .families import family
# Vision-language models: the language model's type (its config is the top level merged with
# `text_config`, or `text_config` alone); the vision side is edgellm/vision's.
MULTIMODAL_TEXT_TYPES = {"qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2", "internvl": None}

DEFAULT_MAX_BATCH_SIZE = 4
DEFAULT_MAX_INPUT_LENGTH = 1024
DEFAULT_MAX_KV_CACHE_CAPACITY = 2048


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    # What the model is.
    model_type: str
    num_decoder_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # What this engine instance supports (set when it is built).
    max_supported_batch_size: int
    max_supported_input_length: int
    max_kv_cache_capacity: int
    reduced_vocab_size: int = 0
    max_supported_lora_rank: int = 0
    # Multimodal RoPE (Qwen2-VL): how many rotary frequencies turn with t, h and w; None: plain RoPE.
    mrope_section: tuple[int, int, int] | None = None
    multimodal: str | None = None  # the vision-language model_type ("qwen2_vl", ...), None for text models
    # The family's differences from the llama layout (set by engine/families/; llama's are the defaults).
    norm: str = "rms"              # "rms" (RMSNorm) or "layer" (LayerNorm with bias)
    mlp: str = "gated"             # "gated" (act(gate) * up, down) or "plain" (fc, activation, proj; biased)
    activation: str = "silu"       # the MLP's activation: the gate's ("silu", "gelu_tanh") or the plain MLP's
    positions: str = "rope"        # "rope" or "learned" (an absolute position table added to the embedding)
    layer_windows: tuple[int, ...] = ()  # each layer's sliding window (0: full attention); (): none anywhere
    rope_local_theta: float | None = None  # the sliding layers' own RoPE base (Gemma 3); None: one table
    sandwich_norms: bool = False   # RMSNorm on the attention and MLP outputs before the residual add (Gemma)
    embed_scale: float = 1.0       # the input embedding's multiplier (Gemma: sqrt(hidden_size))
    attn_scale: float | None = None  # attention's score scale; None: head_dim ** -0.5
    # Weight-only quantization of the layers' linear weights (edgellm/quant): None, "int8", "int4", "fp8".
    quantization: str | None = None
    quantize_lm_head: bool = False
    quant_method: str | None = None  # a checkpoint quantized elsewhere: "awq" / "gptq" (int4; quant/checkpoints.py)
    quant_group: int = 128           # its group along K

    def layer_window(self, layer: int) -> int:
        return self.layer_windows[layer] if self.layer_windows else 0

    @property
    def attention_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    @property
    def output_vocab_size(self) -> int:
        return self.reduced_vocab_size or self.vocab_size

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def describe(self) -> str:
        return "\n".join(f"{f.name:28s} {getattr(self, f.name)}" for f in dataclasses.fields(self))

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, *, max_batch_size: int | None = None,
                       max_input_length: int | None = None,
                       max_kv_cache_capacity: int | None = None) -> "EngineConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{model_dir} has no config.json: expected a Hugging Face model directory "
                                 "(config.json, *.safetensors, tokenizer.json)")
        return cls.from_hf_dict(read_json(path, ModelLoadError), max_batch_size=max_batch_size,
                                max_input_length=max_input_length, max_kv_cache_capacity=max_kv_cache_capacity)

    @classmethod
    def from_hf_dict(cls, hf: dict, *, max_batch_size: int | None = None,
                     max_input_length: int | None = None,
                     max_kv_cache_capacity: int | None = None) -> "EngineConfig":
        multimodal = hf.get("model_type") if hf.get("model_type") in MULTIMODAL_TEXT_TYPES else None
        hf = language_config(hf)
        hf, switches = family(hf.get("model_type"), hf.get("architectures")).describe(hf)
        model_type = hf["model_type"]
        try:
            heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            head_dim = int(hf.get("head_dim") or hidden // heads)
            theta, scaling, mrope = _rope_settings(hf)
            partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                             hf.get("partial_rotary_factor", 1.0))
            rotary_dim = int(head_dim * float(partial))
            max_pos = int(hf.get("max_position_embeddings", 4096))
            if scaling is not None and scaling["rope_type"] == "longrope":
                scaling = _longrope_settings(scaling, hf, max_pos, rotary_dim)
            fields = dict(
                model_type=model_type,
                num_decoder_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=head_dim,
                rotary_dim=rotary_dim,
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                vocab_size=int(hf["vocab_size"]),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=max_pos,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=False,
                o_bias=False,
                qk_norm=False,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=_as_id_tuple(hf.get("eos_token_id")),
                mrope_section=mrope,
                multimodal=multimodal,
            )
            fields.update(switches)
            stored = checkpoint_quantization(hf)
            if stored is not None:
                if fields.get("mlp") == "plain":
                    raise UnsupportedModelError(f"{stored.method} checkpoints of {model_type} are not supported")
                fields.update(quantization=stored.kind, quant_method=stored.method, quant_group=stored.group)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"config.json is missing or has a bad value for {exc}") from exc
        if fields["num_attention_heads"] % fields["num_kv_heads"]:
            raise ModelLoadError("num_attention_heads must be a multiple of num_key_value_heads")
        if rotary_dim % 2 or rotary_dim > head_dim:
            raise UnsupportedModelError(f"rotary dim {rotary_dim} must be even and <= head_dim {head_dim}")
        if mrope is not None and sum(mrope) != rotary_dim // 2:
            raise ModelLoadError(f"mrope_section {list(mrope)} must sum to rotary_dim / 2 = {rotary_dim // 2}")

        # Limits of this engine instance: defaults fit a laptop, bounded by what the model supports.
        capacity = _default(max_kv_cache_capacity, min(DEFAULT_MAX_KV_CACHE_CAPACITY, max_pos))
        input_length = _default(max_input_length, min(DEFAULT_MAX_INPUT_LENGTH, capacity))
        batch = _default(max_batch_size, DEFAULT_MAX_BATCH_SIZE)
        for name, value in (("max_batch_size", batch), ("max_input_length", input_length),
                            ("max_kv_cache_capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
        if input_length > capacity:
            raise ConfigurationError(f"max_input_length ({input_length}) must be <= max_kv_cache_capacity ({capacity})")
        return cls(max_supported_batch_size=batch, max_supported_input_length=input_length,
                   max_kv_cache_capacity=capacity, **fields)


def _default(value, fallback):
    return fallback if value is None else value


def _as_id_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def language_config(hf: dict) -> dict:
    """The language model's part of a config.json: the dict itself for text models; for a
    vision-language model its `text_config` (over the top level, where 4.x-style Qwen2-VL configs keep
    the text fields), with model_type the language family's. Whether the LM head is tied to the
    embedding is the top level's word where it has one: transformers ties by the outer config."""
    kind = hf.get("model_type")
    if kind not in MULTIMODAL_TEXT_TYPES:
        return hf
    text = dict(hf.get("text_config") or {})
    if MULTIMODAL_TEXT_TYPES[kind] is None:  # text_config is a complete config of its own (InternVL)
        if not text:
            raise ModelLoadError(f"config.json of a {kind} model has no text_config")
        merged = text
    else:
        merged = {k: v for k, v in hf.items() if k not in ("vision_config", "text_config")}
        merged.update(text)
        merged["model_type"] = MULTIMODAL_TEXT_TYPES[kind]
    if "tie_word_embeddings" in hf:
        merged["tie_word_embeddings"] = hf["tie_word_embeddings"]
    return merged


def _rope_settings(hf: dict) -> tuple[float, dict | None, tuple[int, int, int] | None]:
    """(theta, scaling, mrope_section) from either transformers 5 `rope_parameters` or 4.x
    `rope_theta`/`rope_scaling` (Qwen2-VL's 4.x configs say rope_type "mrope")."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    rope_type = merged.pop("rope_type", merged.pop("type", "default"))
    section = merged.pop("mrope_section", None)
    merged.pop("mrope_interleaved", None)
    merged.pop("partial_rotary_factor", None)  # read with the head shape (rotary_dim)
    mrope = tuple(int(x) for x in section) if section is not None else None
    if mrope is not None and len(mrope) != 3:
        raise UnsupportedModelError(f"mrope_section must have 3 entries (t, h, w), got {section}")
    if rope_type == "mrope":
        rope_type = "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None, mrope
    merged["rope_type"] = rope_type
    return theta, merged, mrope


def _longrope_settings(scaling: dict, hf: dict, max_pos: int, rotary_dim: int) -> dict:
    """LongRoPE's settings completed as transformers completes them: the original length may sit at
    the top level (Phi-3's 4.x configs), factor defaults to the context extension."""
    original = scaling.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if original is None:
        raise ModelLoadError("longrope scaling needs original_max_position_embeddings")
    for key in ("short_factor", "long_factor"):
        if len(scaling.get(key) or []) != rotary_dim // 2:
            raise ModelLoadError(f"longrope {key} must have rotary_dim / 2 = {rotary_dim // 2} entries")
    factor = scaling.get("factor")
    return {**scaling, "original_max_position_embeddings": int(original),
            "factor": float(factor) if factor is not None else max_pos / int(original)}
