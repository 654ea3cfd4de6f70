"""Logit processing on CUDA with graphs (the module beside it, test_logit_processing.py, runs its host
logic on the references; here the processing kernels are compiled and captured): processed and plain
rows sharing a running batch give the CPU runtime's greedy outputs."""

import pytest

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.engine.graphs import DecodeKey

PROMPT = [1, 17, 33, 8, 61, 40, 9, 22, 5, 71, 12, 17, 33]


def _generate(runtime, new, **settings):
    request = LLMGenerationRequest(requests=[{"input_ids": PROMPT}], max_generate_length=new, ignore_eos=True,
                                   **settings)
    return runtime.handle_request(request).output_ids[0]


@pytest.mark.gpu
def test_on_cuda_with_graphs_processed_rows_match_the_cpu(tiny_models):
    """CUDA graphs with the processing kernels (captured on first use, beside running rows), float32:
    the greedy outputs of processed and plain rows sharing the batch equal the CPU runtime's."""
    cuda = LLMInferenceRuntime(tiny_models["llama"][0], device="cuda", dtype="float32", max_batch_size=3,
                               prefill_budget=4, prefill_chunk_size=8)
    cuda.capture_graphs()
    runtime = LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", max_batch_size=3)
    settings = [dict(temperature=0), dict(temperature=0, repetition_penalty=1.6, logit_bias={33: 2.5}),
                dict(temperature=0, presence_penalty=1.0, frequency_penalty=0.4, min_p=0.2)]
    expected = [_generate(runtime, 30 if i == 0 else 12, **s) for i, s in enumerate(settings)]
    handles = [cuda.submit(LLMGenerationRequest(requests=[{"input_ids": PROMPT}], ignore_eos=True,
                                                max_generate_length=30 if i == 0 else 12, **s))
               for i, s in enumerate(settings)]
    assert [h.result(120).output_ids[0] for h in handles] == expected
    assert any(isinstance(k, DecodeKey) and k.processing for k in cuda.runner.graphs.graphs)
