"""GPT-2 (engine/gpt2.py: learned positions, LayerNorm with bias, plain GELU MLP, Conv1D weights)
against transformers in float32: greedy tokens for a batch of prompts of different lengths (tied and
untied heads), first-step logits, speculative steps (tree positions), a checkpoint saved without the
`transformer.` prefix, and what it refuses."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgellm import LLMGenerationRequest, LLMInferenceRuntime, SpeculativeConfig
from edgellm.errors import LoraError, UnsupportedModelError

from conftest import hf_greedy
from family_models import build_gpt2

PROMPTS = [[5, 9, 13, 7], [20, 21, 22, 23, 24, 25, 26], [40]]
NEW = 24


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def gpt2(request, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("gpt2")
    model = build_gpt2(model_dir, request.param)
    return model_dir, model, LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False)


def greedy(runtime, prompts=PROMPTS, new=NEW):
    return runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": p} for p in prompts],
                                                       max_generate_length=new, temperature=0)).output_ids


def expected(model, prompts=PROMPTS, new=NEW):
    out = []
    for p in prompts:
        tokens = hf_greedy(model, p, new)
        out.append(tokens[:tokens.index(2) + 1] if 2 in tokens else tokens)
    return out


@pytest.mark.slow
def test_greedy_tokens_match_transformers(gpt2):
    _, model, runtime = gpt2
    assert greedy(runtime) == expected(model)


def test_first_step_logits_match(gpt2):
    _, model, runtime = gpt2
    ids = torch.tensor([PROMPTS[1]])
    with torch.inference_mode():
        ours = runtime.runner.prefill_step(runtime.runner.embed(ids), [ids.shape[1]])
    with torch.no_grad():
        theirs = model(ids).logits[:, -1]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_speculative_steps_use_tree_positions(gpt2):
    model_dir, _, runtime = gpt2
    spec = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False,
                               speculative=SpeculativeConfig(method="ngram", max_verify_tokens=4, adaptive=False))
    prompts = [[5, 6, 5, 6, 5, 6, 5], [30, 31, 32, 30, 31]]
    assert greedy(spec, prompts, 16) == greedy(runtime, prompts, 16)


def test_checkpoint_without_the_transformer_prefix(tmp_path):
    """Older GPT-2 checkpoints name tensors "h.0.attn.c_attn.weight", "wte.weight" (and keep the
    attention mask buffers, which are not weights)."""
    model = build_gpt2(tmp_path, tie=True)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    bare["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    save_file(bare, str(tmp_path / "model.safetensors"))
    runtime = LLMInferenceRuntime(tmp_path, device="cpu", cuda_graphs=False)
    assert greedy(runtime, PROMPTS[:1], 8) == expected(model, PROMPTS[:1], 8)


def test_what_gpt2_refuses(gpt2, tmp_path, lora_adapters):
    model_dir, _, _ = gpt2
    with pytest.raises(LoraError, match="gated MLP.*this model is gpt2"):
        LLMInferenceRuntime(model_dir, device="cpu", lora_weights={"a": lora_adapters["a"][0]})
    config = json.loads((model_dir / "config.json").read_text())
    for flag, value, message in (("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx"),
                                 ("activation_function", "relu", "activation_function 'relu'")):
        bad = tmp_path / flag
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({**config, flag: value}))
        with pytest.raises(UnsupportedModelError, match=message):
            LLMInferenceRuntime(bad, device="cpu")
