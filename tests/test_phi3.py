"""Phi-3 (fused qkv_proj / gate_up_proj as stored, partial rotary) against transformers in float32;
longrope scaling is refused clearly until it lands (issue 16); a sliding window bounds the cache."""

import json

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.errors import ConfigurationError, UnsupportedModelError

from conftest import hf_greedy, write_tokenizer

PROMPTS = [[5, 9, 13, 7], [20, 21, 22, 23, 24, 25, 26], [40]]


def build_phi3(model_dir, **overrides):
    import transformers

    config = transformers.Phi3Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}, **overrides)
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(model_dir)
    write_tokenizer(model_dir)
    return model


def test_greedy_tokens_match_transformers(tmp_path):
    model = build_phi3(tmp_path)
    runtime = LLMInferenceRuntime(tmp_path, device="cpu", cuda_graphs=False)
    assert (runtime.config.rotary_dim, runtime.config.head_dim) == (8, 16)
    ours = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": p} for p in PROMPTS],
                                                       max_generate_length=24, temperature=0)).output_ids
    for prompt, tokens in zip(PROMPTS, ours):
        theirs = hf_greedy(model, prompt, 24)
        assert tokens == (theirs[:theirs.index(2) + 1] if 2 in theirs else theirs)


def test_longrope_is_refused_and_a_sliding_window_bounds_the_cache(tmp_path):
    build_phi3(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                                 "long_factor": [2.0] * 4, "original_max_position_embeddings": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="unsupported rope_type 'longrope'"):
        LLMInferenceRuntime(tmp_path, device="cpu")
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    config["sliding_window"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert LLMInferenceRuntime(tmp_path, device="cpu", cuda_graphs=False).config.max_kv_cache_capacity == 32
    with pytest.raises(ConfigurationError, match="sliding window"):
        LLMInferenceRuntime(tmp_path, device="cpu", max_kv_cache_capacity=64)
