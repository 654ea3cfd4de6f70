"""Greedy generation must be token-identical to transformers' generate(do_sample=False)."""

import pytest
import torch

from edgellm import LLMEngineRunner, LLMGenerationRequest, LLMInferenceRuntime
from edgellm.kernels import forbid_reference_on_cuda

from conftest import FAMILIES, TINY_PROMPTS, hf_greedy

NEW_TOKENS = 24


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_greedy_matches_transformers(tiny_models, family):
    model_dir, hf_model = tiny_models[family]
    runtime = LLMInferenceRuntime(model_dir, device="cpu", dtype="float32")
    request = LLMGenerationRequest(requests=[{"input_ids": p} for p in TINY_PROMPTS],
                                   max_generate_length=NEW_TOKENS, temperature=0)
    response = runtime.handle_request(request)
    for i, prompt in enumerate(TINY_PROMPTS):
        # Each row of the padded batch against transformers on that prompt alone.
        expected = hf_greedy(hf_model, prompt, NEW_TOKENS)
        expected = expected[:expected.index(2) + 1] if 2 in expected else expected
        assert response.output_ids[i] == expected, f"row {i} differs from transformers"
        assert response.finish_reasons[i] == ("stop" if expected[-1] == 2 else "length")


@pytest.mark.slow
def test_batch_composition_does_not_change_rows(tiny_models):
    model_dir, _ = tiny_models["qwen3"]
    runtime = LLMInferenceRuntime(model_dir, device="cpu")
    together = runtime.handle_request(LLMGenerationRequest(
        requests=[{"input_ids": p} for p in TINY_PROMPTS], max_generate_length=NEW_TOKENS, top_k=1))
    for i, prompt in enumerate(TINY_PROMPTS):
        alone = runtime.handle_request(LLMGenerationRequest(
            requests=[{"input_ids": prompt}], max_generate_length=NEW_TOKENS, top_k=1))
        assert alone.output_ids[0] == together.output_ids[i]


def test_text_prompt_matches_transformers(tiny_models):
    """The `prompt` path: the tokenizer's ids (BOS added by nobody here) then greedy decode."""
    from transformers import AutoTokenizer

    model_dir, hf_model = tiny_models["llama"]
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    text = "w3 w7 w11 w19 w2"
    runtime = LLMInferenceRuntime(model_dir, device="cpu")
    response = runtime.handle_request(LLMGenerationRequest(requests=[{"prompt": text}], max_generate_length=12,
                                                           temperature=0))
    prompt_ids = hf_tok(text)["input_ids"]
    assert response.prompt_lengths == [len(prompt_ids)]
    expected = hf_greedy(hf_model, prompt_ids, 12)
    expected = expected[:expected.index(2) + 1] if 2 in expected else expected
    assert response.output_ids[0] == expected
    assert response.output_texts[0] == hf_tok.decode(expected, skip_special_tokens=True)


def test_engine_runner_prefill_and_decode_logits(tiny_models):
    """The runner API of seed 002 on embeddings: logits close to transformers' at every step."""
    import torch

    from edgellm import LLMEngineRunner

    model_dir, hf_model = tiny_models["qwen2"]
    runner = LLMEngineRunner(model_dir, device="cpu")
    ids = torch.tensor([TINY_PROMPTS[0][:7], TINY_PROMPTS[2]])
    logits = runner.prefill_step(runner.embed(ids), [7, 7])
    next_ids = torch.tensor([[4], [9]])
    step = runner.decode_step(runner.embed(next_ids))
    with torch.no_grad():
        full = hf_model(torch.cat([ids, next_ids], dim=1)).logits
    torch.testing.assert_close(logits, full[:, 6], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step, full[:, 7], rtol=1e-4, atol=1e-5)
    assert runner.get_linear_kv_cache().lengths[:2].tolist() == [8, 8]


# ---- on a CUDA GPU ----

@pytest.mark.gpu
@pytest.mark.parametrize("family", list(FAMILIES))
def test_float32_greedy_token_identical_on_gpu(tiny_models, family):
    model_dir, hf_model = tiny_models[family]
    hf_model = hf_model.to("cuda")
    runtime = LLMInferenceRuntime(model_dir, device="cuda", dtype="float32")
    with forbid_reference_on_cuda():
        response = runtime.handle_request(LLMGenerationRequest(
            requests=[{"input_ids": p} for p in TINY_PROMPTS], max_generate_length=24, temperature=0))
    for i, prompt in enumerate(TINY_PROMPTS):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                    pad_token_id=2)
        expected = out[0, len(prompt):].tolist()
        expected = expected[:expected.index(2) + 1] if 2 in expected else expected
        assert response.output_ids[i] == expected
    hf_model.to("cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_float16_logits_close_on_gpu(tiny_models, family):
    model_dir, hf_model = tiny_models[family]
    runner = LLMEngineRunner(model_dir, device="cuda", dtype="float16")
    ids = torch.tensor([TINY_PROMPTS[0][:7], TINY_PROMPTS[2]], device="cuda")
    with forbid_reference_on_cuda():
        prefill = runner.prefill_step(runner.embed(ids), [7, 7])
        step = runner.decode_step(runner.embed(torch.tensor([[4], [9]], device="cuda")))
    with torch.no_grad():
        full = hf_model.float()(torch.cat([ids.cpu(), torch.tensor([[4], [9]])], 1)).logits
    torch.testing.assert_close(prefill.cpu(), full[:, 6], rtol=0.02, atol=0.03)
    torch.testing.assert_close(step.cpu(), full[:, 7], rtol=0.02, atol=0.03)
