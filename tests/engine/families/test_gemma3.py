"""Gemma 3 text models against transformers in float32: sliding-window layers with a window shorter
than the prompts (so it matters in prefill and in decode), their own RoPE base, sandwich norms with
the (1 + w) convention, q/k norms, GeGLU, query_pre_attn_scalar and the scaled embedding; the 4.x
config layout; speculative decoding and LoRA on the same model."""

import json

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.engine.config import EngineConfig
from edgellm.errors import ConfigurationError, UnsupportedModelError
from edgellm.speculative import SpeculativeConfig

from conftest import build_lora_adapter, hf_greedy
from family_models import build_gemma3

PROMPTS = [list(range(10, 21)), [5, 9, 13, 7, 30, 31, 32], [40, 41, 42]]  # 11, 7 and 3 tokens


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("gemma3")
    return model_dir, build_gemma3(model_dir)


def _expected(model, prompt, n):
    theirs = hf_greedy(model, prompt, n)
    return theirs[:theirs.index(2) + 1] if 2 in theirs else theirs


@pytest.mark.slow
def test_greedy_tokens_match_transformers(gemma3):
    model_dir, model = gemma3
    runtime = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False)
    cfg = runtime.config
    assert cfg.layer_windows == (6, 6, 0, 6) and cfg.rope_local_theta == 100.0 and cfg.rope_theta == 50000.0
    ours = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": p} for p in PROMPTS],
                                                       max_generate_length=24, temperature=0)).output_ids
    for prompt, tokens in zip(PROMPTS, ours):
        assert tokens == _expected(model, prompt, 24)


def test_logits_match_transformers_step_by_step(gemma3):
    """Prefill past the window, then decode: every step's logits equal transformers' (the sliding
    layers read only their window; the global layer reads everything)."""
    model_dir, model = gemma3
    runner = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False).runner
    prompt = PROMPTS[0]
    sequence = prompt + hf_greedy(model, prompt, 10)
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        past, theirs = out.past_key_values, [out.logits[0, -1]]
        ours = [runner.prefill_step(runner.embed(torch.tensor([prompt])), [len(prompt)])[0]]
        for position in range(len(prompt), len(sequence) - 1):
            token = torch.tensor([[sequence[position]]])
            out = model(token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            theirs.append(out.logits[0, -1])
            ours.append(runner.decode_step(runner.embed(token))[0])
    torch.testing.assert_close(torch.stack(ours), torch.stack(theirs), rtol=1e-4, atol=1e-4)


def test_the_4x_config_layout_reads_the_same(gemma3, tmp_path):
    """Hub configs saved by transformers 4.x name the two RoPE bases rope_theta / rope_local_base_freq
    and the layer kinds by sliding_window_pattern: the same engine config."""
    model_dir, _ = gemma3
    config = json.loads((model_dir / "config.json").read_text())
    new = EngineConfig.from_hf_dict(config)
    old = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=50000.0, rope_local_base_freq=100.0, rope_scaling=None, sliding_window_pattern=3)
    legacy = EngineConfig.from_hf_dict(old)
    assert legacy.layer_windows == (6, 6, 0, 6) == new.layer_windows
    assert (legacy.rope_theta, legacy.rope_local_theta) == (new.rope_theta, new.rope_local_theta)
    assert legacy == new


def test_speculative_decoding_gives_the_same_tokens(tmp_path):
    """N-gram speculation verifies token trees through the sliding window (each node's window counted
    from the position it takes once accepted): the same greedy tokens as transformers."""
    model = build_gemma3(tmp_path, sliding_window=9)
    runtime = LLMInferenceRuntime(tmp_path, device="cpu", cuda_graphs=False,
                                  speculative=SpeculativeConfig(max_verify_tokens=6, ngram_candidates=4))
    repetitive = [10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12]
    for prompt in (repetitive, PROMPTS[1]):
        ours = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": prompt}], max_generate_length=20,
                                                           temperature=0)).output_ids[0]
        assert ours == _expected(model, prompt, 20)
    with pytest.raises(ConfigurationError, match="sliding window"):
        LLMInferenceRuntime(tmp_path, device="cpu", speculative=SpeculativeConfig(max_verify_tokens=9))


def test_lora_on_gemma3(gemma3, tmp_path):
    model_dir, _ = gemma3
    merged = build_lora_adapter(model_dir, tmp_path / "a", seed=1, rank=4, alpha=8.0)
    runtime = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False, lora_weights={"a": tmp_path / "a"})
    out = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": PROMPTS[0], "lora_weights_name": "a"}],
                                                      max_generate_length=8, temperature=0)).output_ids[0]
    assert out == _expected(merged, PROMPTS[0], 8)


def test_what_gemma3_refuses(gemma3, tmp_path):
    model_dir, _ = gemma3
    config = json.loads((model_dir / "config.json").read_text())
    for key, value, message in (("final_logit_softcapping", 30.0, "final_logit_softcapping"),
                                ("hidden_activation", "relu", "hidden_activation 'relu'")):
        with pytest.raises(UnsupportedModelError, match=message):
            EngineConfig.from_hf_dict({**config, key: value})
