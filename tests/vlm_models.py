"""Tiny random vision-language models (Qwen2-VL, Qwen2.5-VL, InternVL) built with transformers and
saved as HF directories, with a word-level tokenizer that knows the image tokens and a Qwen-style chat
template that writes one placeholder per image part (Qwen: <|vision_start|><|image_pad|><|vision_end|>,
InternVL: <IMG_CONTEXT>). Used by the CPU tests and the GPU tests (tests/vision/test_vision_gpu.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>", "<img>", "</img>", "<IMG_CONTEXT>"]
ROLES = ["user", "assistant", "system"]
VOCAB = 128
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIALS) - len(ROLES))]
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END, EOS = 5, 6, 3, 4, 2
IMG_START, IMG_END, IMG_CONTEXT = 7, 8, 9  # InternVL's
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "internvl")
IMAGE_TOKENS = {"qwen2_vl": IMAGE_TOKEN, "qwen2_5_vl": IMAGE_TOKEN, "internvl": IMG_CONTEXT}
# What a plain prompt gets in front per image (multimodal.py), before expansion.
PLACEHOLDERS = {"qwen2_vl": [VISION_START, IMAGE_TOKEN, VISION_END], "qwen2_5_vl": [VISION_START, IMAGE_TOKEN, VISION_END],
                "internvl": [IMG_CONTEXT]}


def chat_template(family: str = "qwen2_vl") -> str:
    image = "<IMG_CONTEXT>" if family == "internvl" else "<|vision_start|><|image_pad|><|vision_end|>"
    return ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image +
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=EOS, bos_token_id=None,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
TOKENS = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
              vision_end_token_id=VISION_END)
# Small images stay small: at most 64 merged tokens per image.
PREPROCESS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64}


def write_tokenizer(model_dir: Path, family: str = "qwen2_vl") -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + ROLES + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(model_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "unk_token": "<unk>",
              "pad_token": "<|im_end|>", "chat_template": chat_template(family)}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))


def build_vlm(family: str, model_dir: Path, seed: int = 0, vision: dict | None = None, text: dict | None = None):
    """family: one of FAMILIES. Returns the transformers model (eval, float32)."""
    import transformers

    if family == "internvl":
        return _build_internvl(model_dir, seed, vision or {}, text or {})

    if family == "qwen2_vl":
        vision_cfg = dict(depth=2, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=2, mlp_ratio=2)
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        vision_cfg = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2,
                          out_hidden_size=TEXT["hidden_size"], window_size=56, fullatt_block_indexes=[1])
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(family)
    vision_cfg.update(vision or {})
    config = config_cls(text_config={**TEXT, **(text or {})}, vision_config=vision_cfg, **TOKENS)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # larger weights than the default init: outputs that differ per image
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.save_pretrained(model_dir)
    write_tokenizer(model_dir)
    (model_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "rescale_factor": 1 / 255, **PREPROCESS}))
    return model


# InternVL: 56-pixel tiles of 4 x 4 patches (4 tokens after the pixel shuffle), up to 4 tiles and a thumbnail.
# Every optional part of the tower is on (q/k norm, q/k/v biases, the final LayerNorm).
INTERNVL_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                       image_size=56, patch_size=14, use_qk_norm=True, attention_bias=True, use_mean_pooling=False)


def _build_internvl(model_dir: Path, seed: int, vision: dict, text: dict):
    import transformers

    text_cfg = {**TEXT, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **text}
    config = transformers.InternVLConfig(vision_config={**INTERNVL_VISION, **vision}, text_config=text_cfg,
                                         image_token_id=IMG_CONTEXT, image_seq_length=4)
    torch.manual_seed(seed)
    model = transformers.InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger weights than the default init; layer scales other than 0.1
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            elif "lambda_" in name:
                p.uniform_(0.2, 1.5)
    model.save_pretrained(model_dir)
    write_tokenizer(model_dir, "internvl")
    (model_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "GotOcr2ImageProcessor", "size": {"height": 56, "width": 56},
        "crop_to_patches": True, "min_patches": 1, "max_patches": 4,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "rescale_factor": 1 / 255}))
    return model


def random_image(width: int, height: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
