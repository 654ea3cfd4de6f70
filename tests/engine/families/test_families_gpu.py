"""GPT-2, Phi-3 and Gemma 3 (a sliding window shorter than the prompts) on a CUDA GPU
(bench/gpu_check.sh): fp16 with CUDA graphs gives fp16 eager's tokens with no reference op, the same
tokens as our float32 run, and the first step's logits stay close to float32. Skipped without a GPU."""

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.kernels import forbid_reference_on_cuda

from family_models import build_gemma3, build_gpt2, build_phi3

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 9, 13, 7], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [40]]
BUILDERS = {"gpt2": lambda d: build_gpt2(d, tie=True), "phi3": build_phi3,
            "gemma3": lambda d: build_gemma3(d, sliding_window=5)}


@pytest.fixture(scope="module", params=list(BUILDERS))
def family_dir(request, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp(request.param)
    BUILDERS[request.param](model_dir)
    return model_dir


def test_graphs_match_eager_without_reference_ops(family_dir):
    request = LLMGenerationRequest(requests=[{"input_ids": p} for p in PROMPTS], max_generate_length=16, temperature=0)
    graphs = LLMInferenceRuntime(family_dir, device="cuda", dtype="float16")
    eager = LLMInferenceRuntime(family_dir, device="cuda", dtype="float16", cuda_graphs=False)
    with forbid_reference_on_cuda():
        first, again, plain = (graphs.handle_request(request).output_ids, graphs.handle_request(request).output_ids,
                               eager.handle_request(request).output_ids)
    assert first == again == plain
    reference = LLMInferenceRuntime(family_dir, device="cuda", dtype="float32", cuda_graphs=False)
    assert reference.handle_request(request).output_ids == first


def test_first_step_logits_close_to_float32(family_dir):
    ids = torch.tensor([PROMPTS[1]])
    out = []
    for dtype in ("float32", "float16"):
        runner = LLMInferenceRuntime(family_dir, device="cuda", dtype=dtype, cuda_graphs=False).runner
        with torch.inference_mode():
            out.append(runner.prefill_step(runner.embed(ids.cuda()), [ids.shape[1]]).float().cpu())
    torch.testing.assert_close(out[1], out[0], rtol=2e-2, atol=2e-2)
