"""Bad input: a clear edgellm.errors exception before any model compute; the runtime stays usable."""

import json
import shutil

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.errors import (ConfigurationError, EdgeLLMError, InvalidRequestError, ModelLoadError,
                            TokenizerError, UnsupportedModelError)

pytestmark = pytest.mark.reference_ops  # host logic (conftest.py)

GOOD = LLMGenerationRequest(requests=[{"input_ids": [1, 4, 8, 15]}, {"messages": [{"role": "user", "content": "w9"}]}],
                            max_generate_length=10, temperature=0)
USER = [{"role": "user", "content": "w1 w2"}]


@pytest.fixture(scope="module")
def runtime(llama_dir):
    return LLMInferenceRuntime(llama_dir, device="cpu", max_batch_size=2, max_input_length=16,
                               max_kv_cache_capacity=32)


def req(items=None, **kw):
    return LLMGenerationRequest(requests=items if items is not None else [{"messages": USER}], **kw)


BAD_REQUESTS = {
    "prompt too long": (req([{"input_ids": [3] * 17}]), "max_input_length 16"),
    "too many items": (req([{"messages": USER}] * 3), "max_batch_size 2"),
    "no input kind": (req([{}]), "exactly one of messages, prompt or input_ids"),
    "two input kinds": (req([{"prompt": "w1", "input_ids": [1]}]), "exactly one of"),
    "unknown item key": (req([{"text": "w1"}]), "unknown keys"),
    "empty messages": (req([{"messages": []}]), "non-empty list"),
    "unknown role": (req([{"messages": [{"role": "wizard", "content": "hi"}]}]), "unknown role 'wizard'"),
    "message without content": (req([{"messages": [{"role": "user"}]}]), "'role' and 'content'"),
    "empty requests": (req([]), "non-empty list"),
    "top_p zero": (req(top_p=0.0), r"top_p must be in \(0, 1\]"),
    "top_p above one": (req(top_p=1.5), r"top_p must be in \(0, 1\]"),
    "negative top_k": (req(top_k=-1), "top_k must be an integer >= 0"),
    "negative temperature": (req(temperature=-0.5), "temperature must be a number >= 0"),
    "nan temperature": (req(temperature=float("nan")), "temperature must be a number >= 0"),
    "zero max length": (req(max_generate_length=0), "max_generate_length must be an integer >= 1"),
    "beyond kv capacity": (req([{"input_ids": [1] * 10}], max_generate_length=30), "at most 22"),
    "id outside vocab": (req([{"input_ids": [1, 96]}]), r"outside the vocabulary \[0, 96\)"),
    "negative id": (req([{"input_ids": [-1]}]), "outside the vocabulary"),
    "float id": (req([{"input_ids": [1, 2.0]}]), "non-empty list of ints"),
    "bool id": (req([{"input_ids": [1, True]}]), "non-empty list of ints"),
    "bad stop": (req(stop=[""]), "stop must be"),
    "unknown lora": (req(lora_weights_name="medical"), "unknown LoRA adapter 'medical'"),
    "bad seed": (req(seed="x"), "seed must be an integer"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_rejected_before_compute_and_runtime_still_answers(runtime, case):
    before = runtime.handle_request(GOOD)
    kv_before = runtime.runner.kv_cache.data.clone()
    lengths_before = runtime.runner.kv_cache.lengths.clone()
    request, message = BAD_REQUESTS[case]
    with pytest.raises(InvalidRequestError, match=message):
        runtime.handle_request(request)
    # Nothing ran: the KV cache is bit-for-bit what the last good request left.
    assert torch.equal(runtime.runner.kv_cache.data, kv_before)
    assert torch.equal(runtime.runner.kv_cache.lengths, lengths_before)
    after = runtime.handle_request(GOOD)
    assert after.output_ids == before.output_ids and after.output_texts == before.output_texts


def test_errors_are_edgellm_errors_and_value_errors(runtime):
    with pytest.raises(EdgeLLMError):
        runtime.handle_request(req(top_k=-3))
    with pytest.raises(ValueError):
        runtime.handle_request(req(top_k=-3))


def test_text_request_without_tokenizer(tmp_path, tiny_models):
    model_dir = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_models["qwen2"][0], model_dir)
    (model_dir / "tokenizer.json").unlink()
    runtime = LLMInferenceRuntime(model_dir, device="cpu")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        runtime.handle_request(req())
    assert len(runtime.handle_request(req([{"input_ids": [1, 2, 3]}], max_generate_length=3)).output_ids[0]) >= 1


def _copy(tiny_models, tmp_path, family="llama"):
    model_dir = tmp_path / family
    shutil.copytree(tiny_models[family][0], model_dir)
    return model_dir


def test_model_dir_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        LLMInferenceRuntime(tmp_path, device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLMInferenceRuntime(tmp_path / "missing", device="cpu")


def test_unsupported_architecture(tiny_models, tmp_path):
    model_dir = _copy(tiny_models, tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="falcon", architectures=["FalconForCausalLM"])
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="model_type='falcon'.*supported model types: llama.*phi3, gpt2"):
        LLMInferenceRuntime(model_dir, device="cpu")


def _rewrite_weights(model_dir, change):
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_weight_tensor(tiny_models, tmp_path):
    model_dir = _copy(tiny_models, tmp_path)
    _rewrite_weights(model_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match="missing tensors: model.layers.1.mlp.up_proj.weight"):
        LLMInferenceRuntime(model_dir, device="cpu")


def test_wrongly_shaped_weight_tensor(tiny_models, tmp_path):
    model_dir = _copy(tiny_models, tmp_path)

    def shrink(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:8]

    _rewrite_weights(model_dir, shrink)
    with pytest.raises(ModelLoadError, match=r"k_proj.weight has shape \(8, 32\), the config needs \(16, 32\)"):
        LLMInferenceRuntime(model_dir, device="cpu")


def test_corrupt_weight_file(tiny_models, tmp_path):
    model_dir = _copy(tiny_models, tmp_path)
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        LLMInferenceRuntime(model_dir, device="cpu")


def test_bad_engine_settings(llama_dir):
    with pytest.raises(ConfigurationError, match="max_input_length \\(64\\) must be <= max_kv_cache_capacity"):
        LLMInferenceRuntime(llama_dir, device="cpu", max_input_length=64, max_kv_cache_capacity=32)
    with pytest.raises(ConfigurationError, match="max_batch_size must be a positive integer"):
        LLMInferenceRuntime(llama_dir, device="cpu", max_batch_size=0)
    with pytest.raises(ConfigurationError, match="unsupported dtype"):
        LLMInferenceRuntime(llama_dir, device="cpu", dtype="int8")
