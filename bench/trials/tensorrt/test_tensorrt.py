"""TensorRTSteps (a trial outside the package): build an engine from the export, bind the runner's
buffers, compare with the triton path. Runs only where TensorRT's Python package imports and a CUDA
GPU is present; neither was available where edgellm is developed and tested, so this test has never
run. From the repository root: `python -m pytest bench/trials/tensorrt`. Not part of CI."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[2] / "tests")]

tensorrt = pytest.importorskip("tensorrt", reason="TensorRT's Python package does not import here (not installed)")
if not torch.cuda.is_available():
    pytest.skip("the TensorRT engine needs a CUDA GPU", allow_module_level=True)

from conftest import build_model  # noqa: E402
from edgellm import LLMEngineRunner  # noqa: E402
from edgellm.export import export_onnx  # noqa: E402
from steps import TensorRTSteps  # noqa: E402

LIMITS = dict(max_batch_size=2, max_input_length=16, max_kv_cache_capacity=40)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tensorrt_engine_matches_triton(tmp_path, family):
    model_dir = tmp_path / family
    model_dir.mkdir()
    build_model(family, model_dir)
    export_onnx(model_dir, tmp_path / "onnx", dtype="float16", progress=lambda _: None, **LIMITS)
    triton = LLMEngineRunner(model_dir, device="cuda", dtype="float16", **LIMITS)
    trt = TensorRTSteps(tmp_path / "onnx", device="cuda")
    prompts, slots = [[1, 5, 7, 9, 11, 13], [1, 20, 21]], [1, 0]
    cache_ptr = trt.kv_cache.data.data_ptr()
    with torch.inference_mode():
        want, got = triton.prefill_tokens(prompts, slots=slots), trt.prefill_tokens(prompts, slots=slots)
        for _ in range(16):  # decode steps replay a CUDA graph around execute_async_v3
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
            token = want.argmax(-1)
            want = triton.decode_step(triton.embed(token[:, None]), slots=slots)
            got = trt.decode_step(trt.embed(token[:, None]), slots=slots)
    assert trt.kv_cache.data.data_ptr() == cache_ptr and got.data_ptr() == trt.logits.data_ptr()
    assert trt._graphs  # decode went through a captured graph
