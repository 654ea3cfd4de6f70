"""Phi-3 (fused qkv_proj / gate_up_proj as stored, partial rotary, LongRoPE) against transformers in
float32 (its sliding window: tests/engine/test_sliding_window.py)."""

import json

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.errors import ModelLoadError
from edgellm.speculative import SpeculativeConfig

from conftest import hf_greedy
from family_models import LONGROPE, build_phi3

PROMPTS = [[5, 9, 13, 7], [20, 21, 22, 23, 24, 25, 26], [40]]


def test_greedy_tokens_match_transformers(tmp_path):
    model = build_phi3(tmp_path)
    runtime = LLMInferenceRuntime(tmp_path, device="cpu", cuda_graphs=False)
    assert (runtime.config.rotary_dim, runtime.config.head_dim) == (8, 16)
    ours = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": p} for p in PROMPTS],
                                                       max_generate_length=24, temperature=0)).output_ids
    for prompt, tokens in zip(PROMPTS, ours):
        theirs = hf_greedy(model, prompt, 24)
        assert tokens == (theirs[:theirs.index(2) + 1] if 2 in theirs else theirs)


def test_longrope_matches_transformers(tmp_path):
    """A prompt past the original context (16) is rotated with the long factors throughout; a prompt
    that stays within it with the short ones: both equal transformers' generate. The runner's own
    steps switch to the long factors at the crossing position, as transformers' forward does step by
    step (the runtime also recomputes the cache there, as generate does: the next test)."""
    model = build_phi3(tmp_path, max_position_embeddings=64, original_max_position_embeddings=16,
                       rope_parameters=LONGROPE)
    runtime = LLMInferenceRuntime(tmp_path, device="cpu", cuda_graphs=False, max_kv_cache_capacity=64,
                                  max_input_length=40)
    long_prompt, short_prompt = list(range(10, 30)), [7, 8, 9]
    ours = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": long_prompt}, {"input_ids": short_prompt}],
                                                       max_generate_length=12, temperature=0)).output_ids
    for prompt, tokens in zip((long_prompt, short_prompt), ours):
        theirs = hf_greedy(model, prompt, 12)
        assert tokens == (theirs[:theirs.index(2) + 1] if 2 in theirs else theirs)
    crossing = list(range(40, 50))  # 10 tokens: decode passes position 16
    sequence = crossing + hf_greedy(model, crossing, 12)
    runner = runtime.runner
    with torch.inference_mode(), torch.no_grad():
        out = model(torch.tensor([crossing]), use_cache=True)
        past, theirs = out.past_key_values, [out.logits[0, -1]]
        ours = [runner.prefill_step(runner.embed(torch.tensor([crossing])), [len(crossing)])[0]]
        for position in range(len(crossing), len(sequence) - 1):
            token = torch.tensor([[sequence[position]]])
            out = model(token, past_key_values=past, use_cache=True, position_ids=torch.tensor([[position]]))
            past = out.past_key_values
            theirs.append(out.logits[0, -1])
            ours.append(runner.decode_step(runner.embed(token))[0])
    torch.testing.assert_close(torch.stack(ours), torch.stack(theirs), rtol=1e-4, atol=1e-4)


def test_a_sequence_crossing_the_original_context_while_decoding_matches_generate(tmp_path):
    """transformers' Phi-3 generate recomputes the whole cache with the long factors at the step whose
    sequence first exceeds the original context; the runtime does the same (runner.prepare_decode_rows),
    in a batch with rows that cross at different steps or never, with and without speculation."""
    model = build_phi3(tmp_path, max_position_embeddings=64, original_max_position_embeddings=16,
                       rope_parameters=LONGROPE)
    prompts = [list(range(40, 50)), list(range(60, 76)), [7, 8, 9], list(range(20, 40))]  # 10, 16, 3, 20 tokens
    request = LLMGenerationRequest(requests=[{"input_ids": p} for p in prompts], max_generate_length=12,
                                   temperature=0)
    expected = []
    for prompt in prompts:
        theirs = hf_greedy(model, prompt, 12)
        expected.append(theirs[:theirs.index(2) + 1] if 2 in theirs else theirs)
    runtime = LLMInferenceRuntime(tmp_path, device="cpu", cuda_graphs=False, max_kv_cache_capacity=64,
                                  max_input_length=40)
    assert runtime.handle_request(request).output_ids == expected
    # The model drafting for itself: most drafts are accepted, so trees would span the switch.
    spec = LLMInferenceRuntime(tmp_path, device="cpu", cuda_graphs=False, max_kv_cache_capacity=64,
                               max_input_length=40, speculative=SpeculativeConfig(
                                   method="draft", draft_model=tmp_path, num_speculative_tokens=4, max_verify_tokens=6))
    for prompt in prompts[:2]:
        ours = spec.handle_request(LLMGenerationRequest(requests=[{"input_ids": prompt}], max_generate_length=12,
                                                        temperature=0)).output_ids[0]
        theirs = hf_greedy(model, prompt, 12)
        assert ours == (theirs[:theirs.index(2) + 1] if 2 in theirs else theirs)


def test_bad_longrope_settings(tmp_path):
    build_phi3(tmp_path, max_position_embeddings=64, original_max_position_embeddings=16, rope_parameters=LONGROPE)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {**LONGROPE, "long_factor": [2.0, 3.0]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="long_factor must have rotary_dim / 2 = 4 entries"):
        LLMInferenceRuntime(tmp_path, device="cpu")
