"""Structured output on CUDA with graphs (test_structured_output.py beside it runs on the CPU): the mask
kernel compiled and captured inside the decode graphs, steps launched in halves (the forward graph, the
masks set, the draw graph). Constrained rows beside free ones give the CPU runtime's tokens (float32,
sampled with seeds: the draws of both devices are the same function of seed and offset), and every
constrained output validates."""

import json

import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from edgellm import LLMGenerationRequest, LLMInferenceRuntime  # noqa: E402
from edgellm.engine.graphs import DecodeKey  # noqa: E402

from byte_level_model import byte_level_model  # noqa: E402
from test_structured_output import SCHEMAS  # noqa: E402


@pytest.mark.gpu
def test_on_cuda_constrained_rows_in_halves_match_the_cpu(tmp_path):
    model_dir = tmp_path / "model"
    byte_level_model(model_dir)
    fmts = [{"type": "json_schema", "json_schema": {"name": "x", "schema": schema}} for schema in SCHEMAS]
    request = LLMGenerationRequest(requests=[{"prompt": f"JSON {i}:", "response_format": fmt}
                                             for i, fmt in enumerate(fmts)] + [{"prompt": "free"}],
                                   max_generate_length=48, temperature=0)
    cpu = LLMInferenceRuntime(model_dir, device="cpu", max_batch_size=4, max_kv_cache_capacity=256)
    expected = cpu.handle_request(request)
    cuda = LLMInferenceRuntime(model_dir, device="cuda", dtype="float32", max_batch_size=4,
                               max_kv_cache_capacity=256)
    cuda.capture_graphs()
    got = cuda.handle_request(request)
    assert got.output_ids == expected.output_ids
    for text, schema in zip(got.output_texts, SCHEMAS):
        jsonschema.validate(json.loads(text), schema)
    parts = {k.part for k in cuda.runner.graphs.graphs if isinstance(k, DecodeKey) and k.processing}
    assert parts >= {"sample"}, parts
    assert cuda._loop.step_counts["decode_in_halves"] >= 10
