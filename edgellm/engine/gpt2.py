"""GPT-2 (GPT2LMHeadModel) described by its differences from the llama family: learned absolute
positions added to the input embedding instead of RoPE, LayerNorm with bias, a plain fc / GELU (tanh)
/ proj MLP with biases, biased fused q/k/v and output projections, multi-head attention, and Conv1D
weights stored [in, out] (transposed once at load). engine/model.py reads the family switches
(EngineConfig.norm / mlp / positions) and runs the same kernels otherwise."""

from __future__ import annotations

from ..errors import UnsupportedModelError

MODEL_TYPE = "gpt2"
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def as_llama_config(hf: dict) -> dict:
    """A GPT-2 config.json in the keys EngineConfig reads, plus the family switches."""
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise UnsupportedModelError(f"GPT-2 with {flag}=true is not supported")
    if not hf.get("scale_attn_weights", True):
        raise UnsupportedModelError("GPT-2 with scale_attn_weights=false is not supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise UnsupportedModelError(f"GPT-2 activation_function {act!r} is not supported; supported: "
                                    f"{', '.join(ACTIVATIONS)}")
    hidden = int(hf["n_embd"])
    return {**hf, "hidden_size": hidden, "num_hidden_layers": int(hf["n_layer"]),
            "num_attention_heads": int(hf["n_head"]), "num_key_value_heads": int(hf["n_head"]),
            "intermediate_size": int(hf.get("n_inner") or 4 * hidden),
            "max_position_embeddings": int(hf.get("n_positions", 1024)),
            "rms_norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
            "family": dict(norm="layer", mlp="plain", activation=ACTIVATIONS[act], positions="learned",
                           qkv_bias=True, o_bias=True)}


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """GPT-2's tensors (as transformers names them under `transformer.`), stored shapes."""
    h, ffn = cfg.hidden_size, cfg.intermediate_size
    shapes = {"transformer.wte.weight": (cfg.vocab_size, h), "transformer.wpe.weight": (cfg.max_position_embeddings, h),
              "transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_decoder_layers):
        p = f"transformer.h.{i}."
        shapes.update({p + "ln_1.weight": (h,), p + "ln_1.bias": (h,), p + "ln_2.weight": (h,), p + "ln_2.bias": (h,),
                       p + "attn.c_attn.weight": (h, 3 * h), p + "attn.c_attn.bias": (3 * h,),
                       p + "attn.c_proj.weight": (h, h), p + "attn.c_proj.bias": (h,),
                       p + "mlp.c_fc.weight": (h, ffn), p + "mlp.c_fc.bias": (ffn,),
                       p + "mlp.c_proj.weight": (ffn, h), p + "mlp.c_proj.bias": (h,)})
    return shapes


def load(cfg, take, take_t):
    """(layers, embed, lm_head, final norm, its bias, position table); take(name) moves a tensor,
    take_t(name) moves a Conv1D weight transposed to [out, in]."""
    from .weights import LayerWeights

    layers = []
    for i in range(cfg.num_decoder_layers):
        p = f"transformer.h.{i}."
        layers.append(LayerWeights(
            input_norm=take(p + "ln_1.weight"), input_norm_bias=take(p + "ln_1.bias"),
            qkv=take_t(p + "attn.c_attn.weight"), qkv_bias=take(p + "attn.c_attn.bias"),
            o_proj=take_t(p + "attn.c_proj.weight"), o_bias=take(p + "attn.c_proj.bias"), q_norm=None, k_norm=None,
            post_norm=take(p + "ln_2.weight"), post_norm_bias=take(p + "ln_2.bias"),
            gate_up=take_t(p + "mlp.c_fc.weight"), gate_up_bias=take(p + "mlp.c_fc.bias"),
            down=take_t(p + "mlp.c_proj.weight"), down_bias=take(p + "mlp.c_proj.bias")))
    embed = take("transformer.wte.weight")
    lm_head = embed if cfg.tie_word_embeddings else take("lm_head.weight")
    return layers, embed, lm_head, take("transformer.ln_f.weight"), take("transformer.ln_f.bias"), \
        take("transformer.wpe.weight")
