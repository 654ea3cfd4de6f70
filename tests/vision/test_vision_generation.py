"""Vision-language models end to end on CPU (float32) against transformers: greedy tokens identical
and first-step logits close, for one image, two images in one message, a batch mixing an image item
with a text-only one, an image in a system turn, and a prompt item with images=; KV reuse and the
encoder cache with images; and the bad inputs images bring."""

import pytest
import torch

from edgellm import LLMGenerationRequest, LLMInferenceRuntime
from edgellm.engine.kv_store import KVReuseSettings
from edgellm.errors import ImageError, InvalidRequestError

from vlm_models import EOS, FAMILIES, IMAGE_TOKENS, PLACEHOLDERS, build_vlm, random_image

NEW = 8


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp(request.param)
    model = build_vlm(request.param, model_dir)
    return model_dir, model, LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False)


def hf_greedy(model, ids, images, runtime, new=NEW):
    """transformers' greedy continuation of our expanded prompt with the same images."""
    ids_t = torch.tensor([ids])
    kwargs = hf_image_inputs(runtime, ids_t, [runtime.vision.encoder.prepare(im) for im in images]) if images else {}
    with torch.no_grad():
        out = model.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=new,
                             do_sample=False, eos_token_id=EOS, pad_token_id=EOS, **kwargs)
    tokens = out[0, len(ids):].tolist()
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


def hf_image_inputs(runtime, ids_t, prepared) -> dict:
    """transformers' image arguments for our prepared images (its processor's pixel_values)."""
    inputs = dict(pixel_values=runtime.vision.encoder.pixel_values(prepared))
    if family(runtime) != "internvl":
        inputs.update(image_grid_thw=torch.tensor([p.grid for p in prepared]),
                      mm_token_type_ids=(ids_t == image_token(runtime)).int())
    return inputs


def family(runtime) -> str:
    return runtime.vision.config.family


def image_token(runtime) -> int:
    return IMAGE_TOKENS[family(runtime)]


def run(runtime, items, new=NEW):
    return runtime.handle_request(LLMGenerationRequest(requests=items, max_generate_length=new, temperature=0))


def user(*parts):
    return {"role": "user", "content": list(parts)}


def image_part(image):
    return {"type": "image", "image": image}


def text_part(text):
    return {"type": "text", "text": text}



def test_one_image(vlm):
    model_dir, model, runtime = vlm
    image = random_image(90, 60, seed=1)
    response = run(runtime, [{"messages": [user(image_part(image), text_part("w3 w4 w5"))]}])
    ids, _ = _prompt(runtime, [user(image_part(image), text_part("w3 w4 w5"))])
    # Qwen: 56 x 84 pixels, 4 x 6 patches, 2 x 3 merged; InternVL: 2 x 1 tiles and a thumbnail, 4 tokens each.
    assert ids.count(image_token(runtime)) == {"internvl": 12}.get(family(runtime), 6)
    assert response.output_ids[0] == hf_greedy(model, ids, [image], runtime)
    assert response.timings.vision_ms > 0 and response.timings.image_preprocess_ms > 0


def test_first_step_logits_close(vlm):
    model_dir, model, runtime = vlm
    images = [random_image(100, 150, seed=2), random_image(60, 60, seed=3)]
    messages = [user(image_part(images[0]), text_part("w1"), image_part(images[1]), text_part("w2 w9"))]
    ids, placed = _prompt(runtime, messages)
    runner = runtime.runner
    with torch.inference_mode():
        embeds = runner.embed(torch.tensor([ids]))
        runtime.vision.write_embeddings(embeds, [placed], [0])
        mrope = {} if placed.positions is None else dict(positions=placed.positions[None],
                                                         position_offsets=[placed.delta])
        ours = runner.prefill_step(embeds, [len(ids)], **mrope)
    ids_t = torch.tensor([ids])
    with torch.no_grad():
        theirs = model(input_ids=ids_t, **hf_image_inputs(runtime, ids_t, placed.images)).logits[:, -1]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_two_images_in_one_message(vlm):
    _, model, runtime = vlm
    images = [random_image(100, 150, seed=2), random_image(60, 60, seed=3)]
    messages = [user(image_part(images[0]), text_part("w1"), image_part(images[1]), text_part("w2 w9"))]
    response = run(runtime, [{"messages": messages}])
    ids, _ = _prompt(runtime, messages)
    assert response.output_ids[0] == hf_greedy(model, ids, images, runtime)


def test_batch_of_image_and_text_items_and_system_image(vlm):
    _, model, runtime = vlm
    image = random_image(70, 120, seed=4)
    with_image = [{"role": "system", "content": [image_part(image), text_part("w7")]},
                  {"role": "user", "content": "w8 w10"}]
    text_only = [{"role": "user", "content": "w11 w12 w13"}]
    response = run(runtime, [{"messages": with_image}, {"messages": text_only}])
    ids0, _ = _prompt(runtime, with_image)
    ids1 = runtime.tokenizer.encode_chat(text_only)
    assert response.output_ids[0] == hf_greedy(model, ids0, [image], runtime)
    assert response.output_ids[1] == hf_greedy(model, ids1, [], runtime)


@pytest.mark.reference_ops
def test_prompt_item_with_images(vlm):
    _, model, runtime = vlm
    image = random_image(64, 64, seed=5)
    response = run(runtime, [{"prompt": "w20 w21", "images": [image]}])
    ids = PLACEHOLDERS[family(runtime)] + runtime.tokenizer.encode("w20 w21")
    placed = runtime.vision.place(ids, [runtime.vision.encoder.prepare(image)], 0, mrope=family(runtime) != "internvl")
    assert response.output_ids[0] == hf_greedy(model, placed.ids, [image], runtime)


@pytest.mark.reference_ops
def test_different_images_give_different_answers_and_the_same_image_reuses(vlm, tmp_path):
    model_dir, _, _ = vlm
    runtime = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False,
                                  kv_reuse=KVReuseSettings(block_tokens=4, gpu_bytes=1 << 22))
    a, b = random_image(84, 84, seed=6), random_image(84, 84, seed=7)
    ask = lambda image: run(runtime, [{"messages": [user(image_part(image), text_part("w30 w31"))]}])  # noqa: E731
    first_a = ask(a)
    first_b = ask(b)
    assert first_b.kv_reuse.reused_tokens < 8  # only the text before the image may be shared
    encoded = runtime.vision.encoder.encoded_images
    again_a = ask(a)
    assert again_a.output_ids == first_a.output_ids
    assert again_a.kv_reuse.reused_tokens >= 8  # the image's blocks came back
    assert runtime.vision.encoder.encoded_images == encoded  # and the encoder did not run
    fresh = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False)
    assert run(fresh, [{"messages": [user(image_part(b), text_part("w30 w31"))]}]).output_ids == first_b.output_ids


@pytest.mark.reference_ops
def test_bad_image_inputs_leave_runtime_usable(vlm, tmp_path, tiny_models):
    _, _, runtime = vlm
    good = [{"messages": [user(image_part(random_image(60, 60, seed=8)), text_part("w1"))]}]
    before = run(runtime, good).output_ids
    with pytest.raises(ImageError, match="not found"):
        run(runtime, [{"messages": [user(image_part(tmp_path / "nope.png"), text_part("w1"))]}])
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(ImageError, match="cannot read"):
        run(runtime, [{"prompt": "w1", "images": [str(tmp_path / "bad.jpg")]}])
    with pytest.raises(InvalidRequestError, match="input_ids items take none"):
        run(runtime, [{"input_ids": [7, 8], "images": [random_image(60, 60)]}])
    with pytest.raises(InvalidRequestError, match="max_input_length"):
        small = LLMInferenceRuntime(vlm[0], device="cpu", cuda_graphs=False, max_input_length=16)
        run(small, [{"prompt": "w1", "images": [random_image(800, 800)]}])
    with pytest.raises(InvalidRequestError, match="placeholders"):
        placeholder = "<IMG_CONTEXT>" if family(runtime) == "internvl" else "<|image_pad|>"
        run(runtime, [{"prompt": f"w1 {placeholder} {placeholder}", "images": [random_image(60, 60)] * 3}])
    assert run(runtime, good).output_ids == before
    text_model = LLMInferenceRuntime(tiny_models["llama"][0], device="cpu", cuda_graphs=False)
    with pytest.raises(InvalidRequestError, match="text-only"):
        run(text_model, [{"messages": [user(image_part(random_image(60, 60)), text_part("w1"))]}])


def _prompt(runtime, messages):
    """Our expanded prompt ids (and placement) for chat messages."""
    from edgellm.multimodal import image_sources, template_messages
    from edgellm.requests import GenerationItem

    item = GenerationItem(messages=messages)
    ids = runtime.tokenizer.encode_chat(template_messages(messages))
    sources = image_sources(item)
    if not sources:
        return ids, None
    placed = runtime.vision.place(ids, runtime.vision.prepare(sources, 0), 0, mrope=family(runtime) != "internvl")
    return placed.ids, placed


@pytest.mark.reference_ops
def test_cli_generate_and_chat_take_images(vlm, tmp_path, capsys, monkeypatch):
    from edgellm.cli import main

    model_dir, _, runtime = vlm
    path = tmp_path / "photo.png"
    random_image(80, 70, seed=9).save(path)
    expected = run(runtime, [{"messages": [user(image_part(str(path)), text_part("w2 w3"))]}], new=4).output_texts[0]
    assert main(["generate", "w2 w3", "-m", str(model_dir), "--image", str(path), "-n", "4", "-t", "0",
                 "--device", "cpu", "--timings"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == expected.strip() and "vision" in out.err
    lines = iter([f"/image {path}", "w2 w3", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _="": next(lines))
    assert main(["chat", "-m", str(model_dir), "-n", "4", "-t", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert expected.strip() in out.out and "goes with your next message" in out.err


@pytest.mark.reference_ops
def test_speculative_decoding_with_images_is_token_identical(vlm):
    """n-gram verification steps run at the image prompt's shifted positions (the per-slot offsets)."""
    from edgellm import SpeculativeConfig

    model_dir, _, runtime = vlm
    spec = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False,
                               speculative=SpeculativeConfig(method="ngram", max_verify_tokens=4, adaptive=False))
    items = [{"prompt": "w1 w2 w1 w2 w1 w2 w1", "images": [random_image(90, 60, seed=1)]}, {"prompt": "w5 w6 w5 w6"}]
    assert run(spec, items, new=12).output_ids == run(runtime, items, new=12).output_ids


def test_image_and_text_requests_from_threads_share_the_batch(vlm):
    """Vision requests on the engine loop: 4 threads at once, image items (one image asked about in
    three turns, another once) beside text items, every answer that of the request alone; a
    multi-turn chat about one image encodes it once (the encoder's output is kept by the image's
    pixels)."""
    import threading

    model_dir, _, runtime = vlm
    a, b = random_image(84, 84, seed=11), random_image(70, 90, seed=12)
    turn = lambda image, words: [{"messages": [user(image_part(image), text_part(words))]}]  # noqa: E731
    requests = [turn(a, "w30 w31"), [{"prompt": "w5 w6 w7"}], turn(a, "w32"), turn(b, "w33 w34"),
                [{"prompt": "w8 w9"}, {"prompt": "w1 w2 w3 w4"}], turn(a, "w35 w36 w37")]
    fresh = LLMInferenceRuntime(model_dir, device="cpu", cuda_graphs=False, max_batch_size=4)
    alone = [run(fresh, items, new=6).output_ids for items in requests]
    encoded = runtime.vision.encoder.encoded_images
    got = [None] * len(requests)

    def worker(t):
        for n in range(t, len(requests), 4):
            got[n] = run(runtime, requests[n], new=6).output_ids

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == alone
    assert runtime.vision.encoder.encoded_images - encoded == 2  # a and b, once each
