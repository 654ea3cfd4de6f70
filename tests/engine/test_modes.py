"""The runner's public API works in and out of torch.inference_mode, before and after the runtime
has used the runner (its buffers made on first use are inference tensors), and gives callers
outside inference mode ordinary tensors. On a GPU the same sequence runs under CUDA graphs (marker gpu, below)."""

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.engine.graphs import PrefillKey
from edgellm.kernels import use_reference

from conftest import random_adapters

PROMPTS = [[1, 17, 33, 8, 61, 40], [1, 50, 6]]


def runner_api_sequence(runner, adapter_path) -> list:
    """Every public runner method once; returns what they returned (as lists), checking that each
    returned tensor is an ordinary tensor when the caller is outside inference mode."""
    outside = not torch.is_inference_mode_enabled()
    device = runner.device
    results = []

    def keep(tensor):
        if outside:
            assert not torch.is_inference(tensor)
            tensor.add_(0)  # in-place updates are allowed on what the caller gets
        results.append(tensor.float().cpu().tolist())
        return tensor

    ids = torch.tensor([PROMPTS[0], PROMPTS[1] + [0] * 3], device=device)
    logits = keep(runner.prefill_step(runner.embed(ids), [6, 3], lora=["a", ""]))
    runner.start_decode(logits.argmax(-1), [0, 1], [0.8, 0.0], [20, 1], [0.9, 1.0], [7, 0], [0, 0], lora=["a", ""])
    keep(runner.decode_sample_step())
    keep(runner.decode_sample_step())
    runner.keep_decode_rows([1])
    keep(runner.decode_sample_step())
    keep(runner.decode_logits())
    runner.end_decode()
    keep(runner.decode_step(runner.embed(torch.tensor([[5]], device=device)), slots=[0], lora=["a"]))
    runner.add_lora_weights("c", adapter_path)
    assert runner.switch_lora_weights("c")
    keep(runner.decode_step(runner.embed(torch.tensor([[6]], device=device)), slots=[0]))  # the active adapter
    runner.switch_lora_weights("")
    runner.remove_lora_weights("c")
    assert runner.capture_decode_graphs([1]) in ([], [1])  # [] where graphs are off (CPU)
    return results


def check_runner_api_in_and_out_of_inference_mode(runtime, adapter_path):
    request = LLMGenerationRequest(requests=[{"input_ids": p} for p in PROMPTS], max_generate_length=4,
                                   temperature=0)
    # On the CPU through the torch references (the Triton interpreter would take half a minute here;
    # which kernels run does not change what inference mode allows).
    with use_reference(runtime.device.type == "cpu"):
        with torch.inference_mode():  # before the runtime has used the runner
            first = runner_api_sequence(runtime.runner, adapter_path)
        answer = runtime.handle_request(request).output_ids
        assert runner_api_sequence(runtime.runner, adapter_path) == first  # outside, after handle_request
        with torch.inference_mode():
            assert runner_api_sequence(runtime.runner, adapter_path) == first
        assert runtime.handle_request(request).output_ids == answer
    # State made at construction stays ordinary: callers may edit it in either mode.
    for tensor in (runtime.runner.kv_cache.data, runtime.runner.kv_cache.lengths, runtime.runner.weights.embed):
        assert not torch.is_inference(tensor)


def test_runner_api_in_and_out_of_inference_mode(tiny_models, lora_adapters):
    runtime = LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_batch_size=2,
                                  lora_weights={"a": lora_adapters["a"][0]})
    check_runner_api_in_and_out_of_inference_mode(runtime, lora_adapters["a"][0])


def test_runner_built_inside_inference_mode_is_usable_outside(tiny_models):
    with torch.inference_mode():
        runtime = LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_batch_size=2)
    runtime.runner.kv_cache.reset()  # an in-place update outside inference mode
    response = runtime.handle_request(LLMGenerationRequest(requests=[{"input_ids": PROMPTS[1]}],
                                                           max_generate_length=3, temperature=0))
    assert len(response.output_ids[0]) >= 1
    with pytest.raises(RuntimeError, match="before start_decode"):  # the runner's own checks still speak
        runtime.runner.decode_sample_step()


# ---- on a CUDA GPU ----

@pytest.mark.gpu
def test_runner_api_in_and_out_of_inference_mode_on_gpu(tiny_models, tmp_path):

    model_dir, _ = tiny_models["llama"]
    adapters = random_adapters(model_dir, tmp_path)
    runtime = LLMInferenceRuntime(model_dir, device="cuda", max_batch_size=2, lora_weights={"a": adapters["a"]},
                                  max_lora_rank=8)
    check_runner_api_in_and_out_of_inference_mode(runtime, adapters["b"])
    assert any(isinstance(k, PrefillKey) for k in runtime.runner.graphs.graphs)  # the graph path was the one used
