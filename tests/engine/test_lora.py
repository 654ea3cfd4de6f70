"""LoRA adapters against the peft package's merged-weights models (float32, greedy, token-identical):
one adapter, switching, disabling, and a batch whose rows use different adapters; then bad input."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.engine.graphs import DecodeKey
from edgellm.errors import InvalidRequestError, LoraError
from edgellm.kernels import forbid_reference_on_cuda

from conftest import TINY_PROMPTS, assert_rows_match_transformers, hf_greedy

NEW = 12


def greedy(runtime, prompts=TINY_PROMPTS, new=NEW, **kw):
    return runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": p} for p in prompts],
                                                       max_generate_length=new, temperature=0, **kw))


def quick(runtime, name):
    """A short greedy run (the interpreter is slow): enough to see that the runtime still answers."""
    return greedy(runtime, [TINY_PROMPTS[1]], 3, lora_weights_name=name).output_ids


@pytest.fixture(scope="module")
def runtime(tiny_models, lora_adapters):
    return LLMInferenceRuntime(tiny_models["llama"][0], device="cpu",
                               lora_weights={name: path for name, (path, _) in lora_adapters.items()})


def test_one_adapter_matches_peft_merged_model(runtime, lora_adapters, tiny_models):
    response = greedy(runtime, lora_weights_name="a")
    assert_rows_match_transformers(response, lora_adapters["a"][1], TINY_PROMPTS, NEW)
    base = greedy(runtime, lora_weights_name="")
    assert_rows_match_transformers(base, tiny_models["llama"][1], TINY_PROMPTS, NEW)
    assert response.output_ids != base.output_ids  # the adapter really changes the output


@pytest.mark.reference_ops
def test_switching_and_disabling_keep_the_engine_intact(runtime, lora_adapters, tiny_models):
    weights_before = [t.clone() for t in (runtime.runner.weights.layers[0].qkv, runtime.runner.weights.embed)]
    assert runtime.get_available_lora_weights() == ["a", "b"]
    for name, reference in (("b", lora_adapters["b"][1]), ("", tiny_models["llama"][1]), ("a", lora_adapters["a"][1])):
        assert runtime.switch_lora_weights(name) is True
        assert runtime.get_active_lora_weights_name() == name
        assert_rows_match_transformers(greedy(runtime, TINY_PROMPTS[:2], 8, lora_weights_name=None), reference,
                                       TINY_PROMPTS[:2], 8)  # the request names none: the active adapter
    runtime.switch_lora_weights("")
    assert torch.equal(runtime.runner.weights.layers[0].qkv, weights_before[0])
    assert torch.equal(runtime.runner.weights.embed, weights_before[1])


def test_rows_of_one_batch_use_different_adapters(runtime, lora_adapters, tiny_models):
    items = [{"input_ids": TINY_PROMPTS[0], "lora_weights_name": "a"}, {"input_ids": TINY_PROMPTS[1], "lora_weights_name": "b"},
             {"input_ids": TINY_PROMPTS[2], "lora_weights_name": ""}]
    response = runtime.handle_request(LLMGenerationRequest(requests=items, max_generate_length=NEW, temperature=0))
    references = [lora_adapters["a"][1], lora_adapters["b"][1], tiny_models["llama"][1]]
    for i, (prompt, reference) in enumerate(zip(TINY_PROMPTS, references)):
        expected = hf_greedy(reference, prompt, NEW)
        expected = expected[:expected.index(2) + 1] if 2 in expected else expected
        assert response.output_ids[i] == expected, f"row {i}"
    # An item's name overrides the request's: the request says "b", the item without a name takes it.
    mixed = runtime.handle_request(LLMGenerationRequest(
        requests=[{"input_ids": TINY_PROMPTS[0], "lora_weights_name": "a"}, {"input_ids": TINY_PROMPTS[1]}],
        max_generate_length=NEW, temperature=0, lora_weights_name="b"))
    assert mixed.output_ids == [response.output_ids[0], response.output_ids[1]]


@pytest.mark.reference_ops
def test_bare_safetensors_file_with_alpha(tiny_models, lora_adapters, tmp_path):
    path_a = lora_adapters["a"][0]
    bare = tmp_path / "a.safetensors"
    shutil.copy(path_a / "adapter_model.safetensors", bare)
    runtime = LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_lora_rank=8, max_loras=2)
    assert runtime.get_available_lora_weights() == []
    runtime.add_lora_weights("bare", bare, alpha=8.0)
    assert_rows_match_transformers(greedy(runtime, lora_weights_name="bare"), lora_adapters["a"][1], TINY_PROMPTS, NEW)
    runtime.remove_lora_weights("bare")
    runtime.add_lora_weights("again", path_a)  # the freed slot is reused
    assert runtime.get_available_lora_weights() == ["again"]


def _truncated(src, dst):
    dst.mkdir()
    shutil.copy(src / "adapter_config.json", dst)
    data = (src / "adapter_model.safetensors").read_bytes()
    (dst / "adapter_model.safetensors").write_bytes(data[:len(data) // 2])
    return dst


def _wrong_shape(src, dst):
    dst.mkdir()
    shutil.copy(src / "adapter_config.json", dst)
    tensors = load_file(src / "adapter_model.safetensors")
    key = next(k for k in tensors if "layers.1.mlp.down_proj.lora_B" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def _lm_head_target(src, dst):
    dst.mkdir()
    shutil.copy(src / "adapter_config.json", dst)
    tensors = load_file(src / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


BAD_ADAPTERS = {
    "missing": (lambda src, dst: dst / "nowhere", "does not exist"),
    "truncated": (_truncated, "cannot read LoRA weights"),
    "wrong shape": (_wrong_shape, r"layer 1 down_proj has A .* and B \(33, 4\)"),
    "unsupported target": (_lm_head_target, "lm_head.lora_A.weight' is not a LoRA A/B matrix"),
    "no config": (lambda src, dst: (dst.mkdir(), shutil.copy(src / "adapter_model.safetensors", dst), dst)[-1],
                  "no adapter_config.json"),
}


@pytest.mark.reference_ops
@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_bad_adapter_files_load_nothing(runtime, lora_adapters, tmp_path, case):
    make, message = BAD_ADAPTERS[case]
    before = quick(runtime, "a")
    with pytest.raises(LoraError, match=message):
        runtime.add_lora_weights("bad", make(lora_adapters["a"][0], tmp_path / "bad"))
    assert runtime.get_available_lora_weights() == ["a", "b"]
    assert quick(runtime, "a") == before


@pytest.mark.reference_ops
def test_bad_lora_use_is_a_clear_error(runtime, tiny_models, lora_adapters):
    before = quick(runtime, "b")
    with pytest.raises(InvalidRequestError, match="unknown LoRA adapter 'medical'"):
        greedy(runtime, lora_weights_name="medical")
    with pytest.raises(InvalidRequestError, match="item 1: unknown LoRA adapter 'x'"):
        runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": [1]}, {"input_ids": [1], "lora_weights_name": "x"}]))
    with pytest.raises(LoraError, match="unknown LoRA adapter 'medical'"):
        runtime.switch_lora_weights("medical")
    with pytest.raises(LoraError, match="already loaded"):
        runtime.add_lora_weights("a", lora_adapters["a"][0])
    assert runtime.get_active_lora_weights_name() == ""
    assert quick(runtime, "b") == before
    with pytest.raises(LoraError, match="rank 8, above the engine's max_lora_rank 4"):
        small = LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_lora_rank=4)
        small.add_lora_weights("b", lora_adapters["b"][0])
    with pytest.raises(LoraError, match="rank 8, above max_lora_rank 4"):
        LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_lora_rank=4,
                            lora_weights={"b": lora_adapters["b"][0]})
    with pytest.raises(LoraError, match="built without LoRA support"):
        LLMInferenceRuntime(tiny_models["llama"][0], device="cpu").add_lora_weights("a", lora_adapters["a"][0])
    with pytest.raises(LoraError, match="needs its lora_alpha"):
        small.add_lora_weights("bare", lora_adapters["a"][0] / "adapter_model.safetensors")


# ---- on a CUDA GPU ----

@pytest.mark.gpu
def test_lora_mixed_batch_on_gpu_matches_the_cpu_reference(tiny_models, tmp_path):
    """Rows with adapter a, adapter b and none in one batch, graphs on and off, float32: the tokens of
    the CPU reference path (which the tests above check against peft's merged models)."""
    from edgellm.benchmark import random_lora_dir

    model_dir, _ = tiny_models["llama"]
    adapters = {"a": random_lora_dir(model_dir, tmp_path / "a", rank=4, alpha=8.0, seed=1),
                "b": random_lora_dir(model_dir, tmp_path / "b", rank=16, alpha=8.0, seed=2, targets=("q", "v", "down"))}
    request = LLMGenerationRequest(requests=[{"input_ids": p, "lora_weights_name": name}
                                             for p, name in zip(TINY_PROMPTS, ["a", "b", ""])],
                                   max_generate_length=12, temperature=0)
    base_only = LLMGenerationRequest(requests=[{"input_ids": p} for p in TINY_PROMPTS], max_generate_length=12,
                                     temperature=0)
    expected = LLMInferenceRuntime(model_dir, device="cpu", lora_weights=adapters).handle_request(request).output_ids
    base = LLMInferenceRuntime(model_dir, device="cpu").handle_request(base_only).output_ids
    assert expected[:2] != base[:2] and expected[2] == base[2]
    runtimes = {graphs: LLMInferenceRuntime(model_dir, device="cuda", dtype="float32", lora_weights=adapters,
                                            cuda_graphs=graphs) for graphs in (True, False)}
    for runtime in runtimes.values():
        with forbid_reference_on_cuda():
            assert runtime.handle_request(request).output_ids == expected
            runtime.switch_lora_weights("b")  # switching keeps graphs valid: same tokens after a round trip
            runtime.switch_lora_weights("")
            assert runtime.handle_request(request).output_ids == expected
            assert runtime.handle_request(base_only).output_ids == base
    # Batches with adapters and without run on separate graphs (3 rows padded to 4, then fewer as rows end).
    assert {k.lora for k in runtimes[True].runner.graphs.graphs if isinstance(k, DecodeKey)} == {True, False}
