"""The llama layout, which the other families describe themselves against: RMSNorm before attention
and before the MLP, RoPE, grouped-query attention, a SwiGLU MLP, q/k/v and gate/up stored apart
(fused into one matrix each at load, so a block runs two matmuls fewer). Its members differ in
attention details only: qwen2 biases q/k/v, qwen3 normalises q and k per head, mistral (and qwen
with use_sliding_window, on its upper layers) attends through a sliding window."""

from __future__ import annotations

from ...errors import UnsupportedModelError

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def describe(hf: dict) -> tuple[dict, dict]:
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"unsupported hidden_act {hf.get('hidden_act')!r}; only 'silu' is supported")
    if hf.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported")
    kind, bias = hf.get("model_type"), bool(hf.get("attention_bias", False))
    return hf, dict(qkv_bias=kind == "qwen2" or bias, o_bias=kind != "qwen2" and bias, qk_norm=kind == "qwen3",
                    layer_windows=sliding_windows(hf, every_layer=kind == "mistral"))


def sliding_windows(hf: dict, *, every_layer: bool = False) -> tuple[int, ...]:
    """Each layer's sliding window (0: full attention), or () when no layer has one. Where the
    config lists layer_types, those; else every layer (mistral, phi3) or, for qwen with
    use_sliding_window, the layers from max_window_layers on (as transformers reads them)."""
    window = hf.get("sliding_window")
    layers = int(hf["num_hidden_layers"])
    qwen_switch = "use_sliding_window" in hf
    if window is None or (qwen_switch and not hf["use_sliding_window"]):
        return ()
    if hf.get("layer_types"):
        kinds = list(hf["layer_types"])
        if len(kinds) != layers or set(kinds) - {"sliding_attention", "full_attention"}:
            raise UnsupportedModelError(f"layer_types must name sliding_attention / full_attention for each of "
                                        f"the {layers} layers, got {kinds}")
        windows = tuple(int(window) if k == "sliding_attention" else 0 for k in kinds)
    elif every_layer:
        windows = (int(window),) * layers
    elif qwen_switch:
        first = int(hf.get("max_window_layers", layers))
        windows = tuple(int(window) if i >= first else 0 for i in range(layers))
    else:
        return ()
    return windows if any(windows) else ()


def expected_shapes(cfg, *, fused: bool = False, extra_norms: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    """fused: q/k/v and gate/up stored as one matrix each (Phi-3); extra_norms: more per-layer norm
    weights of hidden size (Gemma's)."""
    h, d = cfg.hidden_size, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_decoder_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       a + "o_proj.weight": (h, cfg.q_size), p + "mlp.down_proj.weight": (h, cfg.intermediate_size)})
        shapes.update({p + name + ".weight": (h,) for name in extra_norms})
        if fused:
            shapes.update({a + "qkv_proj.weight": (cfg.q_size + 2 * cfg.kv_size, h),
                           p + "mlp.gate_up_proj.weight": (2 * cfg.intermediate_size, h)})
        else:
            shapes.update({a + "q_proj.weight": (cfg.q_size, h), a + "k_proj.weight": (cfg.kv_size, h),
                           a + "v_proj.weight": (cfg.kv_size, h), p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
                           p + "mlp.up_proj.weight": (cfg.intermediate_size, h)})
        if cfg.qkv_bias:
            shapes.update({a + "q_proj.bias": (cfg.q_size,), a + "k_proj.bias": (cfg.kv_size,),
                           a + "v_proj.bias": (cfg.kv_size,)})
        if cfg.o_bias:
            shapes[a + "o_proj.bias"] = (h,)
        if cfg.qk_norm:
            shapes.update({a + "q_norm.weight": (d,), a + "k_norm.weight": (d,)})
    return shapes


def load(cfg, t, *, fused: bool = False, pre_mlp_norm: str = "post_attention_layernorm", norm=None):
    """ModelWeights from `t` (weights.Tensors). pre_mlp_norm: the checkpoint's name of the norm in
    front of the MLP; norm: a transform of every RMSNorm weight at load (Gemma's 1 + w)."""
    from ..weights import LayerWeights, ModelWeights

    layers = []
    for i in range(cfg.num_decoder_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        layers.append(LayerWeights(
            input_norm=t.take(p + "input_layernorm.weight", norm),
            qkv=t.take(a + "qkv_proj.weight") if fused else t.fused(a + "q_proj.weight", a + "k_proj.weight",
                                                                     a + "v_proj.weight"),
            qkv_bias=t.fused(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias") if cfg.qkv_bias else None,
            o_proj=t.take(a + "o_proj.weight"),
            o_bias=t.take(a + "o_proj.bias") if cfg.o_bias else None,
            q_norm=t.take(a + "q_norm.weight", norm) if cfg.qk_norm else None,
            k_norm=t.take(a + "k_norm.weight", norm) if cfg.qk_norm else None,
            post_norm=t.take(p + pre_mlp_norm + ".weight", norm),
            gate_up=t.take(p + "mlp.gate_up_proj.weight") if fused else t.fused(p + "mlp.gate_proj.weight",
                                                                                 p + "mlp.up_proj.weight"),
            down=t.take(p + "mlp.down_proj.weight")))
    embed = t.take("model.embed_tokens.weight")
    lm_head = embed if cfg.tie_word_embeddings else t.take("lm_head.weight")
    return ModelWeights(embed=embed, layers=layers, final_norm=t.take("model.norm.weight", norm), lm_head=lm_head)
