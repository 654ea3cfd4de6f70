"""On a CUDA GPU (bench/gpu_check.sh runs these on the device): end-to-end generation through the
compiled Triton kernels against transformers, and proof that no reference op runs in the hot path.
Skipped where torch sees no GPU (CI); the kernel-level tests in test_kernels_triton.py run there."""

import pytest
import torch

from edgellm import LLMEngineRunner, LLMGenerationRequest, LLMInferenceRuntime
from edgellm.kernels import forbid_reference_on_cuda

from conftest import FAMILIES, hf_greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[1, 17, 33, 8, 61, 40, 9, 22, 5, 71, 12], [1, 50, 6], [1, 90, 14, 27, 3, 88, 44]]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_float32_greedy_token_identical_on_gpu(tiny_models, family):
    model_dir, hf_model = tiny_models[family]
    hf_model = hf_model.to("cuda")
    runtime = LLMInferenceRuntime(model_dir, device="cuda", dtype="float32")
    with forbid_reference_on_cuda():
        response = runtime.handle_request(LLMGenerationRequest(
            requests=[{"input_ids": p} for p in PROMPTS], max_generate_length=24, temperature=0))
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                    pad_token_id=2)
        expected = out[0, len(prompt):].tolist()
        expected = expected[:expected.index(2) + 1] if 2 in expected else expected
        assert response.output_ids[i] == expected
    hf_model.to("cpu")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_float16_logits_close_on_gpu(tiny_models, family):
    model_dir, hf_model = tiny_models[family]
    runner = LLMEngineRunner(model_dir, device="cuda", dtype="float16")
    ids = torch.tensor([PROMPTS[0][:7], PROMPTS[2]], device="cuda")
    with forbid_reference_on_cuda():
        prefill = runner.prefill_step(runner.embed(ids), [7, 7])
        step = runner.decode_step(runner.embed(torch.tensor([[4], [9]], device="cuda")))
    with torch.no_grad():
        full = hf_model.float()(torch.cat([ids.cpu(), torch.tensor([[4], [9]])], 1)).logits
    torch.testing.assert_close(prefill.cpu(), full[:, 6], rtol=0.02, atol=0.03)
    torch.testing.assert_close(step.cpu(), full[:, 7], rtol=0.02, atol=0.03)


def test_reference_switch_really_forbids(tiny_models):
    from edgellm.kernels.dispatch import ReferenceOnCudaError, KernelOp

    probe = KernelOp("probe", lambda x: x)  # an op with no Triton kernel
    with forbid_reference_on_cuda(), pytest.raises(ReferenceOnCudaError):
        probe(torch.zeros(1, device="cuda"))


def test_sampling_on_gpu_is_seeded_and_runs_without_reference(tiny_models):
    model_dir, _ = tiny_models["llama"]
    runtime = LLMInferenceRuntime(model_dir, device="cuda")
    request = LLMGenerationRequest(requests=[{"input_ids": PROMPTS[0]}, {"input_ids": PROMPTS[1]}],
                                   max_generate_length=16, temperature=0.8, top_k=20, top_p=0.9, seed=5)
    with forbid_reference_on_cuda():
        first = runtime.handle_request(request)
        again = runtime.handle_request(request)
    assert first.output_ids == again.output_ids
