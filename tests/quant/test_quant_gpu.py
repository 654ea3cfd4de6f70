"""Quantized decode on a CUDA GPU (bench/gpu_check.sh): for int8, int4 and fp8, fp16 with CUDA graphs
gives fp16 eager's tokens with no reference op (the dequantizing GEMV in the graph), and the first
steps' logits stay near the same quantized model computed in float32 (dequantized weights through
cuBLAS, the reference path). Skipped without a GPU."""

import contextlib

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.kernels import forbid_reference_on_cuda

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 9, 13, 7, 30], [20, 21, 22, 23, 24, 25, 26, 27, 28], [40]]


@contextlib.contextmanager
def _counting_dequantize():
    """Within the block, each call of ops.dequantize (a packed weight made float for cuBLAS) is listed."""
    from edgellm.kernels import ops

    calls, original = [], ops.dequantize
    ops.dequantize = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    try:
        yield calls
    finally:
        ops.dequantize = original


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_graphs_match_eager_and_float32(tiny_models, kind):
    model_dir = tiny_models["llama"][0]
    request = LLMGenerationRequest(requests=[{"input_ids": p} for p in PROMPTS], max_generate_length=16, temperature=0)
    graphs = LLMInferenceRuntime(model_dir, device="cuda", dtype="float16", quantization=kind)
    eager = LLMInferenceRuntime(model_dir, device="cuda", dtype="float16", cuda_graphs=False, quantization=kind)
    with forbid_reference_on_cuda():
        first, again, plain = (graphs.handle_request(request).output_ids, graphs.handle_request(request).output_ids,
                               eager.handle_request(request).output_ids)
    assert first == again == plain
    reference = LLMInferenceRuntime(model_dir, device="cuda", dtype="float32", cuda_graphs=False, quantization=kind)
    assert reference.handle_request(request).output_ids == first
    # decode-step logits of the packed GEMV (fp16) against float32 over the dequantized weights
    out = []
    for runtime in (eager, reference):
        runner = runtime.runner
        ids = torch.tensor([PROMPTS[1]], device="cuda")
        with torch.inference_mode():
            runner.prefill_step(runner.embed(ids), [ids.shape[1]])
            out.append(runner.decode_step(runner.embed(ids[:, -1:])).float().cpu())
    torch.testing.assert_close(out[0], out[1], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_forty_rows_decode_through_the_packed_gemv(tiny_models, kind):
    """A decode step of 40 rows reads packed weights in the GEMV (blocks of up to 64 rows,
    gemv.PACKED_MAX_ROWS) instead of dequantizing them for cuBLAS: its logits stay near float32 over the
    dequantized weights, and the runtime's greedy tokens for 40 rows match float32's."""
    model_dir = tiny_models["llama"][0]
    prompts = [[(7 * i + j) % 90 + 3 for j in range(1 + i % 9)] for i in range(40)]
    fp16 = LLMInferenceRuntime(model_dir, device="cuda", dtype="float16", cuda_graphs=False, quantization=kind,
                               max_batch_size=64)
    reference = LLMInferenceRuntime(model_dir, device="cuda", dtype="float32", cuda_graphs=False,
                                    quantization=kind, max_batch_size=64)
    out = []
    with _counting_dequantize() as dequantized:
        for runtime in (fp16, reference):
            runner = runtime.runner
            ids = torch.tensor([p[-1:] for p in prompts], device="cuda")
            with torch.inference_mode():
                runner.prefill_step(runner.embed(torch.tensor([[5, 9, 13]] * 40, device="cuda")), [3] * 40)
                dequantized.clear()
                out.append(runner.decode_step(runner.embed(ids)).float().cpu())
                if runtime is fp16:
                    assert not dequantized  # (the GEMV read the packed weights)
    torch.testing.assert_close(out[0], out[1], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("codes", ["f32", "ptx", "words-ptx"])
def test_int4_prefill_read_packed_matches_the_dequantized_path(tiny_models, monkeypatch, codes):
    """EDGELLM_PACKED_PREFILL=gemm (kernels/matmul.py over the packed int4 weights, no dequantized copy)
    and the decode A/B switches: a long prefill's logits near float32 over the dequantized weights, no
    dequantize in the step, and the greedy tokens of the default path."""
    model_dir = tiny_models["llama"][0]
    request = LLMGenerationRequest(requests=[{"input_ids": p} for p in PROMPTS], max_generate_length=12, temperature=0)
    plain = LLMInferenceRuntime(model_dir, device="cuda", dtype="float16", cuda_graphs=False, quantization="int4")
    for name, value in (("EDGELLM_PACKED_PREFILL", "gemm"), ("EDGELLM_INT4_CODES", codes),
                        ("EDGELLM_GEMV_SPLIT", "auto"), ("EDGELLM_PACKED_ROW_DOTS", "1")):
        monkeypatch.setenv(name, value)
    packed = LLMInferenceRuntime(model_dir, device="cuda", dtype="float16", quantization="int4")
    reference = LLMInferenceRuntime(model_dir, device="cuda", dtype="float32", cuda_graphs=False, quantization="int4")
    assert packed.handle_request(request).output_ids == plain.handle_request(request).output_ids
    ids = torch.tensor([[(3 * j) % 90 + 5 for j in range(200)]], device="cuda")
    out = []
    with _counting_dequantize() as dequantized:
        for runtime in (packed, reference):
            with torch.inference_mode():
                out.append(runtime.runner.prefill_step(runtime.runner.embed(ids), [ids.shape[1]]).float().cpu())
            if runtime is packed:
                assert not dequantized  # (the prefill read the packed weights)
    torch.testing.assert_close(out[0], out[1], rtol=2e-2, atol=2e-2)
