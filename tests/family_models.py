"""Tiny random models of the families beyond the llama layout (GPT-2, Gemma 3, Phi-3), built with
transformers and saved as HF directories: what the family tests and the tests of other modules share."""

import torch

from conftest import write_tokenizer


def build_gpt2(model_dir, tie: bool, seed: int = 0, **overrides):
    import transformers

    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                     eos_token_id=2, tie_word_embeddings=tie, **overrides)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # larger than the default init: outputs that depend on every weight
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(model_dir)
    write_tokenizer(model_dir)
    return model


LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


def build_gemma3(model_dir, **overrides):
    import transformers

    settings = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0, sliding_window=6, layer_types=LAYER_TYPES, query_pre_attn_scalar=24,
                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
    config = transformers.Gemma3TextConfig(**{**settings, **overrides})
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # random norms too (transformers starts them at 0, i.e. a scale of 1)
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.3)
    model.save_pretrained(model_dir)
    write_tokenizer(model_dir)
    return model


def build_phi3(model_dir, **overrides):
    import transformers

    settings = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                    tie_word_embeddings=False, sliding_window=None,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    config = transformers.Phi3Config(**{**settings, **overrides})
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(model_dir)
    write_tokenizer(model_dir)
    return model


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.3, 1.7, 2.0], "long_factor": [2.0, 3.5, 6.0, 9.0],
            "original_max_position_embeddings": 16}
