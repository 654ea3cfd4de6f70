"""Vision-language models on a CUDA GPU (bench/gpu_check.sh): fp16 with CUDA graphs gives the tokens
of our own float32 path (CPU, torch references), the vision encoder and the whole request run no
reference op, and the decode positions' offsets work inside the graphs. Skipped without a GPU."""

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.kernels import forbid_reference_on_cuda

from vlm_models import FAMILIES, build_vlm, random_image

pytestmark = pytest.mark.gpu


def user(*parts):
    return {"role": "user", "content": list(parts)}


REQUESTS = [
    [{"messages": [user({"type": "image", "image": random_image(90, 60, seed=1)}, {"type": "text", "text": "w3 w4"})]}],
    [{"messages": [user({"type": "image", "image": random_image(100, 150, seed=2)}, {"type": "text", "text": "w1"},
                        {"type": "image", "image": random_image(60, 60, seed=3)}, {"type": "text", "text": "w9"})]},
     {"messages": [{"role": "user", "content": "w11 w12 w13"}]},
     {"prompt": "w20 w21", "images": [random_image(200, 120, seed=4)]}],
    # No image: the text path (token ids in, the embedding gather and multimodal-RoPE positions inside the graph).
    [{"messages": [{"role": "user", "content": "w11 w12 w13"}]}, {"prompt": "w5 w6 w7 w8"}],
]


@pytest.fixture(scope="module", params=FAMILIES)
def vlm_dir(request, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp(request.param)
    build_vlm(request.param, model_dir)
    return model_dir


NEAR_TIE = 0.05  # fp16 may pick the other of two tokens whose float32 logits are this close


def float32_gaps(cpu: LLMInferenceRuntime, item, tokens: list[int]) -> list[float]:
    """Along the GPU's tokens, each token's float32 logit below the float32 argmax (0: the argmax),
    from our own float32 path (CPU, torch references), prompt and images placed as the runtime does."""
    prompts, images, *_ = cpu._prepare(LLMGenerationRequest(requests=[item]))
    runner, ids, placed = cpu.runner, prompts[0], images[0]
    gaps = []
    with torch.inference_mode():
        embeds = runner.embed(torch.tensor([ids]))
        extra = {}
        if placed is not None:
            cpu.vision.write_embeddings(embeds, [placed], [0])
            if placed.positions is not None:  # Qwen's multimodal RoPE
                extra = dict(positions=placed.positions[None], position_offsets=[placed.delta])
        logits = runner.prefill_step(embeds, [len(ids)], **extra)[0]
        for token in tokens:
            gaps.append((logits.max() - logits[token]).item())
            logits = runner.decode_step(runner.embed(torch.tensor([[token]])))[0]
    return gaps


@pytest.mark.parametrize("items", REQUESTS, ids=["one-image", "batch", "text-only"])
def test_float16_graphs_match_our_float32_path(vlm_dir, items):
    """fp16 with CUDA graphs: exactly the tokens of fp16 eager, and at every step the float32 argmax
    or a token within a near-tie of it (our float32 path, teacher-forced along the GPU's tokens)."""
    cpu = LLMInferenceRuntime(vlm_dir, device="cpu", dtype="float32")
    gpu = LLMInferenceRuntime(vlm_dir, device="cuda", dtype="float16")
    eager = LLMInferenceRuntime(vlm_dir, device="cuda", dtype="float16", cuda_graphs=False)
    request = LLMGenerationRequest(requests=items, max_generate_length=8, temperature=0)
    with forbid_reference_on_cuda():
        got = gpu.handle_request(request)
        again = gpu.handle_request(request)  # graphs replayed, encoder outputs from the cache
        plain = eager.handle_request(request)
    assert got.output_ids == plain.output_ids == again.output_ids
    assert (got.timings.vision_ms > 0) == (items is not REQUESTS[-1])
    exact = 0
    for item, tokens in zip(items, got.output_ids):
        gaps = float32_gaps(cpu, item, tokens)
        assert max(gaps) < NEAR_TIE, (tokens, gaps)
        exact += sum(g == 0 for g in gaps)
    assert exact >= 0.8 * sum(len(t) for t in got.output_ids)


def test_encoder_matches_transformers_on_gpu(vlm_dir):
    """The encoder alone in float32 on CUDA (Triton kernels) against transformers' vision tower."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(vlm_dir)
    cls = {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration, "internvl": transformers.InternVLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[config.model_type]
    model = cls.from_pretrained(vlm_dir, dtype=torch.float32).to("cuda").eval()
    runtime = LLMInferenceRuntime(vlm_dir, device="cuda", dtype="float32")
    encoder = runtime.vision.encoder
    prepared = [encoder.prepare(random_image(w, h, seed=s)) for s, (w, h) in enumerate([(90, 60), (300, 200)])]
    with forbid_reference_on_cuda():
        ours = torch.cat(encoder.encode(prepared))
    pixels = encoder.pixel_values(prepared)
    assert pixels.is_cuda
    with torch.no_grad(), torch.backends.cudnn.flags(allow_tf32=False):  # their patch convolution: no TF32
        if config.model_type == "internvl":
            theirs = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                                    vision_feature_select_strategy="default")
        else:
            theirs = model.model.visual(pixels, grid_thw=torch.tensor([p.grid for p in prepared], device="cuda"))
    theirs = getattr(theirs, "pooler_output", theirs)
    torch.testing.assert_close(ours, theirs.reshape(ours.shape), rtol=1e-3, atol=1e-3)


def test_pixels_normalised_on_the_device_equal_the_host_arithmetic(vlm_dir):
    """Rescale / normalise / patch layout run where the uint8 pixels are: on CUDA they give the host's
    float32 values (which equal transformers' processors: test_preprocess.py)."""
    from edgellm.vision.internvl_preprocess import preprocess_internvl
    from edgellm.vision.qwen_preprocess import preprocess_qwen

    runtime = LLMInferenceRuntime(vlm_dir, device="cuda", dtype="float16", max_batch_size=1)
    encoder, cfg = runtime.vision.encoder, runtime.vision.config
    image = random_image(300, 200, seed=5)
    on_device = encoder.pixel_values([encoder.prepare(image)])
    host = preprocess_internvl(image, cfg.preprocess) if cfg.family == "internvl" else preprocess_qwen(image, cfg.preprocess)[0]
    assert on_device.is_cuda and on_device.dtype == torch.float32
    torch.testing.assert_close(on_device.cpu(), torch.from_numpy(host), atol=1e-6, rtol=0)


def test_encoder_graphs_replay_what_eager_computes(vlm_dir):
    """A shape's second use captures a CUDA graph; replays take each call's own pixels (two images of
    one size, alternating) and give the eager forward's embeddings; other shapes stay eager."""
    runtime = LLMInferenceRuntime(vlm_dir, device="cuda", dtype="float16", max_batch_size=1)
    encoder = runtime.vision.encoder
    tower = encoder.tower
    images = [encoder.prepare(random_image(90, 60, seed=s)) for s in (1, 2)]
    eager = lambda ims: tower.compute([t.cuda() for t in tower.host_tensors(ims)], tower.layout(ims))  # noqa: E731
    with torch.no_grad():
        reference = [eager([im]) for im in images]
        with forbid_reference_on_cuda():
            got = [torch.cat(encoder.run([im])) for im in images * 2]  # eager, capture + replay, replay, replay
        assert encoder.graphs.replays == 3
        for ours, ref in zip(got, reference * 2):
            torch.testing.assert_close(ours, ref, atol=2e-3, rtol=2e-3)
        assert not torch.equal(got[0], got[1])
        other = encoder.prepare(random_image(120, 90, seed=3))
        torch.testing.assert_close(torch.cat(encoder.run([other])), eager([other]), atol=2e-3, rtol=2e-3)
        assert encoder.graphs.replays == 3  # a new shape's first use runs eagerly
