"""Vision-language models on a CUDA GPU (bench/gpu_check.sh): fp16 with CUDA graphs gives the tokens
of our own float32 path (CPU, torch references), the vision encoder and the whole request run no
reference op, and the decode positions' offsets work inside the graphs. Skipped without a GPU."""

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.kernels import forbid_reference_on_cuda

from vlm_models import build_vlm, random_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def user(*parts):
    return {"role": "user", "content": list(parts)}


REQUESTS = [
    [{"messages": [user({"type": "image", "image": random_image(90, 60, seed=1)}, {"type": "text", "text": "w3 w4"})]}],
    [{"messages": [user({"type": "image", "image": random_image(100, 150, seed=2)}, {"type": "text", "text": "w1"},
                        {"type": "image", "image": random_image(60, 60, seed=3)}, {"type": "text", "text": "w9"})]},
     {"messages": [{"role": "user", "content": "w11 w12 w13"}]},
     {"prompt": "w20 w21", "images": [random_image(200, 120, seed=4)]}],
]


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def vlm_dir(request, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp(request.param)
    build_vlm(request.param, model_dir)
    return model_dir


@pytest.mark.parametrize("items", REQUESTS, ids=["one-image", "batch"])
def test_float16_graphs_match_our_float32_path(vlm_dir, items):
    cpu = LLMInferenceRuntime(vlm_dir, device="cpu", dtype="float32")
    gpu = LLMInferenceRuntime(vlm_dir, device="cuda", dtype="float16")
    request = LLMGenerationRequest(requests=items, max_generate_length=8, temperature=0)
    expected = cpu.handle_request(request).output_ids
    with forbid_reference_on_cuda():
        got = gpu.handle_request(request)
        again = gpu.handle_request(request)  # graphs replayed, encoder outputs from the cache
    assert got.output_ids == expected
    assert again.output_ids == expected
    assert got.timings.vision_ms > 0


def test_encoder_matches_transformers_on_gpu(vlm_dir):
    """The encoder alone in float32 on CUDA (Triton kernels) against transformers' vision tower."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(vlm_dir)
    cls = transformers.Qwen2VLForConditionalGeneration if config.model_type == "qwen2_vl" \
        else transformers.Qwen2_5_VLForConditionalGeneration
    model = cls.from_pretrained(vlm_dir, dtype=torch.float32).to("cuda").eval()
    runtime = LLMInferenceRuntime(vlm_dir, device="cuda", dtype="float32")
    encoder = runtime.vision.encoder
    prepared = [encoder.prepare(random_image(w, h, seed=s)) for s, (w, h) in enumerate([(90, 60), (300, 200)])]
    with forbid_reference_on_cuda():
        ours = torch.cat(encoder.encode(prepared))
    pixels = torch.cat([torch.from_numpy(p.pixels) for p in prepared]).cuda()
    with torch.no_grad():
        theirs = model.model.visual(pixels, grid_thw=torch.tensor([p.grid for p in prepared], device="cuda"))
    theirs = getattr(theirs, "pooler_output", theirs)
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)
