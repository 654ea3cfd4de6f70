"""The engine loop's check (test_engine_loop.py: threads submitting varied requests at random times get
the answers of each request alone) on CUDA, under graphs, with the kernels (no reference op)."""

import pytest

from edgellm import LLMInferenceRuntime
from edgellm.kernels import forbid_reference_on_cuda

from test_engine_loop import check_threads_at_random_times


@pytest.mark.gpu
def test_threads_on_the_gpu_under_graphs_get_the_answers_of_one_by_one(tiny_models, lora_adapters):
    """The same check on CUDA in float32: decode, prefill and mixed graphs captured as the requests
    come (mixed ones while rows decode, those rows set aside and put back), steps run ahead."""
    from edgellm.engine.graphs import MixedKey

    runtime = LLMInferenceRuntime(tiny_models["llama"][0], device="cuda", dtype="float32", max_batch_size=4,
                                  prefill_budget=8,
                                  lora_weights={"a": lora_adapters["a"][0], "b": lora_adapters["b"][0]})
    check_threads_at_random_times(runtime, forbid_reference_on_cuda)
    assert any(isinstance(key, MixedKey) for key in runtime.runner.graphs.graphs)
