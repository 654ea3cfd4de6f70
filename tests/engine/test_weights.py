"""Checkpoint formats, dtypes and config variants."""

import shutil

import pytest
import torch

from edgellm import EngineConfig, LLMEngineRunner, LLMGenerationRequest, LLMInferenceRuntime

from conftest import build_model, hf_greedy

PROMPT = [1, 33, 8, 61, 40, 9]


def test_sharded_checkpoint_loads_identically(tiny_models, tmp_path):
    _, hf_model = tiny_models["llama"]
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="20KB")
    shutil.copy(tiny_models["llama"][0] / "tokenizer.json", sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    runtime = LLMInferenceRuntime(sharded, device="cpu")
    out = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": PROMPT}], max_generate_length=16,
                                                      temperature=0))
    expected = hf_greedy(hf_model, PROMPT, 16)
    assert out.output_ids[0] == expected[:len(out.output_ids[0])]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits_close_to_float32(tiny_models, dtype):
    model_dir, hf_model = tiny_models["qwen3"]
    runner = LLMEngineRunner(model_dir, device="cpu", dtype=dtype)
    assert runner.weights.embed.dtype == getattr(torch, dtype)
    ids = torch.tensor([PROMPT])
    logits = runner.prefill_step(runner.embed(ids), [len(PROMPT)])
    with torch.no_grad():
        reference = hf_model(ids).logits[:, -1]
    # bfloat16 keeps 8 mantissa bits: allow about two of its ulps at the logits' scale.
    tolerance = {"float16": 0.02, "bfloat16": 0.15}[dtype]
    torch.testing.assert_close(logits, reference, rtol=0.02, atol=tolerance)
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))


def test_transformers4_style_rope_config_reads_the_same():
    """Older configs keep rope_theta / rope_scaling at the top level (scaling 'type' key too)."""
    base = dict(model_type="llama", num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                intermediate_size=48, vocab_size=96)
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    v5 = EngineConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}})
    v4 = EngineConfig.from_hf_dict({**base, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **scaling}})
    assert (v4.rope_theta, v4.rope_scaling) == (v5.rope_theta, v5.rope_scaling)
    assert v4.rope_scaling["rope_type"] == "llama3"


def test_llama3_inv_freq_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from edgellm.kernels import rope_inv_freq

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    torch.testing.assert_close(rope_inv_freq(64, 500000.0, scaling), expected, rtol=0, atol=0)


def test_qwen2_bias_is_used(tmp_path):
    """A qwen2 model whose q/k/v biases are large: without them, logits would differ."""
    hf_model = build_model("qwen2", tmp_path)
    with torch.no_grad():
        for layer in hf_model.model.layers:
            layer.self_attn.q_proj.bias.normal_(std=2.0)
            layer.self_attn.v_proj.bias.normal_(std=2.0)
    hf_model.save_pretrained(tmp_path)
    runner = LLMEngineRunner(tmp_path, device="cpu")
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        reference = hf_model(ids).logits[:, -1]
    torch.testing.assert_close(runner.prefill_step(runner.embed(ids), [len(PROMPT)]), reference,
                               rtol=1e-4, atol=1e-5)
