"""Gemma 3 text models (Gemma3ForCausalLM, model_type gemma3_text) against the llama layout:
- sliding-window layers interleaved with global ones (layer_types, or every sliding_window_pattern-th
  layer global), each kind with its own RoPE base (rope_local_base_freq / rope_theta, or transformers
  5's rope_parameters per layer kind; scaling applies to the global layers);
- four RMSNorms per layer: the attention and MLP outputs are normalised before their residual add
  ("sandwich" norms), and every RMSNorm (q/k norms and the final one too) scales by 1 + weight,
  folded into the weights at load;
- a GeGLU MLP (GELU, tanh approximation), attention scaled by query_pre_attn_scalar ** -0.5, and
  the input embedding scaled by sqrt(hidden_size)."""

from __future__ import annotations

from ...errors import UnsupportedModelError
from . import llama

MODEL_TYPES = ("gemma3_text",)
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def describe(hf: dict) -> tuple[dict, dict]:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise UnsupportedModelError(f"Gemma 3 with {key}={hf[key]} is not supported")
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError("Gemma 3 with use_bidirectional_attention=true is not supported")
    act = hf.get("hidden_activation", hf.get("hidden_act", "gelu_pytorch_tanh"))
    if act not in ACTIVATIONS:
        raise UnsupportedModelError(f"Gemma 3 hidden_activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    layers = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % int(hf.get("sliding_window_pattern", 6))
                                      else "full_attention" for i in range(layers)]
    hf = {**hf, "layer_types": types, "sliding_window": int(hf.get("sliding_window") or 4096),
          "tie_word_embeddings": hf.get("tie_word_embeddings", True)}
    full, local = _rope_per_kind(hf)
    hf["rope_parameters"] = full
    hf.pop("rope_scaling", None)
    bias = bool(hf.get("attention_bias", False))
    return hf, dict(activation=ACTIVATIONS[act], qk_norm=True, sandwich_norms=True, qkv_bias=bias, o_bias=bias,
                    embed_scale=int(hf["hidden_size"]) ** 0.5,
                    attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
                    layer_windows=llama.sliding_windows(hf), rope_local_theta=local)


def _rope_per_kind(hf: dict) -> tuple[dict, float]:
    """(the global layers' rope_parameters, the sliding layers' theta), from transformers 5's
    {layer kind: parameters} or 4.x's rope_theta / rope_scaling / rope_local_base_freq."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = {**(hf.get("rope_scaling") or {}), **params}
        local = {"rope_theta": hf.get("rope_local_base_freq", DEFAULT_THETA["sliding_attention"])}
    full.setdefault("rope_theta", hf.get("rope_theta", DEFAULT_THETA["full_attention"]))
    if local.get("rope_type", "default") != "default":
        raise UnsupportedModelError(f"Gemma 3 sliding layers with rope_type {local['rope_type']!r} are not supported")
    return full, float(local.get("rope_theta", DEFAULT_THETA["sliding_attention"]))


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    return llama.expected_shapes(cfg, extra_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"))


def _unit_offset(weight):
    return 1.0 + weight.float()  # Gemma's RMSNorm scales by 1 + w (in float32)


def load(cfg, t):
    weights = llama.load(cfg, t, pre_mlp_norm="pre_feedforward_layernorm", norm=_unit_offset)
    for i, layer in enumerate(weights.layers):
        p = f"model.layers.{i}."
        layer.attn_out_norm = t.take(p + "post_attention_layernorm.weight", _unit_offset)
        layer.mlp_out_norm = t.take(p + "post_feedforward_layernorm.weight", _unit_offset)
    return weights
