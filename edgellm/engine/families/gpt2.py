"""GPT-2 (GPT2LMHeadModel) described by its differences from the llama family: learned absolute
positions added to the input embedding instead of RoPE, LayerNorm with bias, a plain fc / GELU (tanh)
/ proj MLP with biases, biased fused q/k/v and output projections, multi-head attention, and Conv1D
weights stored [in, out] (transposed once at load)."""

from __future__ import annotations

from ...errors import UnsupportedModelError

MODEL_TYPES = ("gpt2",)
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def describe(hf: dict) -> tuple[dict, dict]:
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
    return ({**hf, "hidden_size": hidden, "num_hidden_layers": int(hf["n_layer"]),
             "num_attention_heads": int(hf["n_head"]), "num_key_value_heads": int(hf["n_head"]),
             "intermediate_size": int(hf.get("n_inner") or 4 * hidden),
             "max_position_embeddings": int(hf.get("n_positions", 1024)),
             "rms_norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
             "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True))},
            dict(norm="layer", mlp="plain", activation=ACTIVATIONS[act], positions="learned", qkv_bias=True,
                 o_bias=True))


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


def load(cfg, t):
    """ModelWeights from `t` (weights.Tensors); Conv1D weights taken transposed to [out, in]."""
    from ..weights import LayerWeights, ModelWeights

    layers = []
    for i in range(cfg.num_decoder_layers):
        p = f"transformer.h.{i}."
        layers.append(LayerWeights(
            input_norm=t.take(p + "ln_1.weight"), input_norm_bias=t.take(p + "ln_1.bias"),
            qkv=t.transposed(p + "attn.c_attn.weight"), qkv_bias=t.take(p + "attn.c_attn.bias"),
            o_proj=t.transposed(p + "attn.c_proj.weight"), o_bias=t.take(p + "attn.c_proj.bias"), q_norm=None,
            k_norm=None, post_norm=t.take(p + "ln_2.weight"), post_norm_bias=t.take(p + "ln_2.bias"),
            gate_up=t.transposed(p + "mlp.c_fc.weight"), gate_up_bias=t.take(p + "mlp.c_fc.bias"),
            down=t.transposed(p + "mlp.c_proj.weight"), down_bias=t.take(p + "mlp.c_proj.bias")))
    embed = t.take("transformer.wte.weight")
    lm_head = embed if cfg.tie_word_embeddings else t.take("lm_head.weight")
    return ModelWeights(embed=embed, layers=layers, final_norm=t.take("transformer.ln_f.weight"), lm_head=lm_head,
                        final_norm_bias=t.take("transformer.ln_f.bias"), positions=t.take("transformer.wpe.weight"))
